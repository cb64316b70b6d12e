#[cluster::main(workers = "two")]
async fn main() {}
