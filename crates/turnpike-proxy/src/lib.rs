//! Turnpike's data plane: listeners, router, proxy pipeline and upstream pools.

pub mod body;
pub mod client;
pub mod error;
pub mod router;
pub mod tls;
pub mod upstream;
