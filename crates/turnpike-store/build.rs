// `sqlx::migrate!` embeds the migration files at compile time but cannot tell Cargo about
// them on stable Rust; without this a new or edited migration would not trigger a rebuild.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
