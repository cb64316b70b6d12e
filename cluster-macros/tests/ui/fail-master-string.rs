#[cluster::main(master = "run_master")]
async fn main() {}
