#[cluster::main]
fn main() {}
