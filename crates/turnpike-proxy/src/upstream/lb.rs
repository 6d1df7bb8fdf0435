//! Load-balancing algorithms.
//!
//! PLACEHOLDER: plain round robin so the rest of the gateway can be built; replaced by the
//! real algorithms (smooth WRR, least connections, P2C-EWMA, consistent hashing).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use turnpike_model::LoadBalancer;

use super::{SelectInput, Target};

/// A balancer built for one target set.
pub struct Balancer {
    next: AtomicUsize,
}

impl Balancer {
    /// Builds the balancer for `targets`.
    pub fn new(_config: &LoadBalancer, _targets: &[Arc<Target>]) -> Self {
        Self {
            next: AtomicUsize::new(0),
        }
    }

    /// Picks a target among those `usable` accepts.
    pub fn pick(
        &self,
        targets: &[Arc<Target>],
        _input: &SelectInput<'_>,
        usable: &dyn Fn(&Target) -> bool,
    ) -> Option<Arc<Target>> {
        let n = targets.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| &targets[(start + i) % n])
            .find(|t| usable(t))
            .cloned()
    }
}
