//! Trains smelt's fixture models (see `smelt_fixtures::trainer`).
//!
//! cargo run --release --example train_fixtures -- [--out DIR] [--seed N]

fn main() -> anyhow::Result<()> {
    smelt_fixtures::trainer::main()
}
