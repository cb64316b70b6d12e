#[cluster::main(workers = 2, flavor = 3)]
async fn main() {}
