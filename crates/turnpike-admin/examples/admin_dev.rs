//! Serves the Admin API alone, for trying it out and for API fuzzers (schemathesis):
//! `cargo run -p turnpike-admin --example admin_dev -- STORE_URL [ADDR]`. Prints the bootstrap
//! token on first start.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "sqlite://admin-dev.db".to_owned());
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:9080".to_owned());
    let store = turnpike_store::Store::open(&url).await?;
    if let Some(secret) = turnpike_admin::bootstrap(&store).await? {
        println!("bootstrap token for user admin: {secret}");
    }
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("Admin API on http://{}/admin/v1", listener.local_addr()?);
    axum::serve(
        listener,
        turnpike_admin::router(turnpike_admin::AdminState::new(store)),
    )
    .await?;
    Ok(())
}
