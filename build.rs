// `sqlx::migrate!()` embeds migrations/ at compile time but, on stable Rust, does not tell cargo
// to watch it: without this, a new migration alone would not rebuild the binaries.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
