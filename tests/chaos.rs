//! The chaos runner (`ff_completions_lab::chaos`): concurrent producers, several kinds of
//! subscribers and a seeded schedule of real faults on each backend, then a ledger of what the
//! producers committed against what every subscriber received.
//!
//! ```text
//! cargo test --test chaos                                   # CI: 30 s per backend
//! cargo test --release --test chaos -- --backend postgres --duration 30m --seed 42
//! ```

fn main() {
    ff_completions_lab::chaos::main();
}
