//! Turnpike's data plane: listeners, router, proxy pipeline and upstream pools.

pub mod access;
pub mod body;
pub mod cache;
pub mod client;
pub mod clientcert;
pub mod demo;
pub mod error;
pub mod gateway;
pub mod h1guard;
pub mod listener;
pub(crate) mod observe;
pub mod policy;
pub mod proxy;
pub mod quota;
pub mod reqbody;
pub mod router;
pub mod snapshot;
pub mod status;
pub mod tls;
pub mod transcode;
pub mod transform;
pub mod upstream;
pub mod versioning;
