//! Turnpike's data plane: listeners, router, proxy pipeline and upstream pools.

pub mod body;
pub mod client;
pub mod error;
pub mod h1guard;
pub mod listener;
pub mod router;
pub mod tls;
pub mod upstream;
pub mod proxy;
pub mod reqbody;
pub mod snapshot;
pub mod gateway;
pub mod demo;
