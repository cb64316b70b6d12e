mod app {
    #[cluster::main]
    pub async fn main() {}
}

fn main() {
    let _: fn() = app::main;
}
