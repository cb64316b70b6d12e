#[cluster::main]
async fn main(role: u32) {}
