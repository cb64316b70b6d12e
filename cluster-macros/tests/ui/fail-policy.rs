#[cluster::main(policy = "roundrobin")]
async fn main() {}
