//! Rebuilds the lab when a demo migration or the demo's Lua library changes: `sqlx::migrate!`
//! and `include_str!` embed them at compile time.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-changed=lua");
}
