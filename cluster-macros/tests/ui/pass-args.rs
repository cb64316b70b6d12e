// Compiles every argument; the annotated `main` is type-checked here, not run (a master runs
// until it is stopped).
mod app {
    async fn run_master(mut master: cluster::Master) {
        while let Some(_event) = master.recv().await {}
    }

    async fn run_agent() {
        while let Some(_message) = cluster::worker::recv().await {}
    }

    #[cluster::main(
        workers = 2,
        worker_threads = 1,
        kill_timeout_ms = 5000,
        exit_on_panic = false,
        policy = "reuseport",
        balancer = "least-connections",
        master = run_master,
        agent = run_agent
    )]
    pub async fn main() -> std::io::Result<()> {
        let _listener = cluster::net::TcpListener::bind("127.0.0.1:0").await?;
        Ok(())
    }

    #[allow(dead_code)]
    fn returns_the_body_output() -> std::io::Result<()> {
        main()
    }
}

fn main() {
    let _ = app::main;
}
