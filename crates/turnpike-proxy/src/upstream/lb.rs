//! Load-balancing algorithms.
//!
//! A [`Balancer`] is built once per target set (on every configuration build and every DNS
//! change) and then only read on the hot path. Every algorithm receives the caller's `usable`
//! predicate, which encodes availability (health, ejection, weight) and "already tried by this
//! request"; a target it rejects is never returned. Targets with weight 0 are drained and never
//! chosen whatever `usable` says.
//!
//! - **Smooth weighted round robin** (nginx): each pick adds every usable target's weight to
//!   its running score, picks the highest score and subtracts the total usable weight from it.
//!   Over a cycle each target gets exactly its weight, spread out rather than in bursts.
//! - **Least connections**: the fewest `(in_flight + 1) / weight`; ties are broken at random
//!   so idle targets share the load instead of the first one taking everything.
//! - **Power of two choices on EWMA latency**: two distinct usable targets drawn at random,
//!   the one with the lower `ewma × (in_flight + 1) / weight` wins.
//! - **Consistent hashing**: a ring of virtual nodes (160 per weight unit, scaled down for very
//!   large pools) keyed by a stable hash, so every gateway node maps a key to the same target
//!   and removing a target only moves the keys it owned.

use std::cmp::Ordering as CmpOrdering;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use http::HeaderName;
use turnpike_model::{HashOn, LoadBalancer};

use super::{SelectInput, Target};

/// Virtual nodes per unit of weight on the consistent-hash ring.
const VNODES_PER_WEIGHT: u64 = 160;
/// Upper bound on ring size; past it every target's share is scaled down proportionally so
/// huge weights or pools do not cost megabytes of ring and slow rebuilds.
const MAX_RING_POINTS: u64 = 1 << 16;

/// A balancer built for one target set.
///
/// Indices inside the balancer refer to positions in the target slice it was built from; the
/// same slice must be passed to [`Balancer::pick`] (as `TargetSet` does).
pub struct Balancer {
    kind: Kind,
}

enum Kind {
    RoundRobin(SmoothWrr),
    LeastConnections,
    P2cEwma,
    ConsistentHash { on: KeySource, ring: Ring },
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match &self.kind {
            Kind::RoundRobin(_) => "round_robin",
            Kind::LeastConnections => "least_connections",
            Kind::P2cEwma => "p2c_ewma",
            Kind::ConsistentHash { .. } => "consistent_hash",
        };
        f.debug_struct("Balancer")
            .field("algorithm", &name)
            .finish_non_exhaustive()
    }
}

impl Balancer {
    /// Builds the balancer for `targets`.
    pub fn new(config: &LoadBalancer, targets: &[Arc<Target>]) -> Self {
        let kind = match config {
            LoadBalancer::RoundRobin => Kind::RoundRobin(SmoothWrr::new(targets.len())),
            LoadBalancer::LeastConnections => Kind::LeastConnections,
            LoadBalancer::P2cEwma => Kind::P2cEwma,
            LoadBalancer::ConsistentHash { hash_on } => Kind::ConsistentHash {
                on: KeySource::new(hash_on),
                ring: Ring::new(targets),
            },
        };
        Self { kind }
    }

    /// Picks a target among those `usable` accepts, or `None` when it accepts none.
    pub fn pick(
        &self,
        targets: &[Arc<Target>],
        input: &SelectInput<'_>,
        usable: &dyn Fn(&Target) -> bool,
    ) -> Option<Arc<Target>> {
        // Drained targets are out whatever the caller's predicate says.
        let ok = |t: &Target| t.weight > 0 && usable(t);
        match &self.kind {
            Kind::RoundRobin(wrr) => wrr.pick(targets, &ok),
            Kind::LeastConnections => least_connections(targets, &ok),
            Kind::P2cEwma => p2c_ewma(targets, &ok),
            Kind::ConsistentHash { on, ring } => ring.pick(targets, on.key_hash(input), &ok),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Smooth weighted round robin

/// nginx's smooth weighted round robin.
///
/// The state is one score per target and each pick updates all of them together, so it sits
/// behind a `Mutex`: the critical section is a single pass over the (small) target list with
/// a few integer additions and the cheap `usable` checks (atomic loads), never an await or an
/// allocation, and a lock-free variant would need either a precomputed schedule (which loses
/// smoothness as soon as targets are skipped) or a CAS over the whole vector.
struct SmoothWrr {
    current: Mutex<Vec<i64>>,
}

impl SmoothWrr {
    fn new(n: usize) -> Self {
        Self {
            current: Mutex::new(vec![0; n]),
        }
    }

    fn pick(
        &self,
        targets: &[Arc<Target>],
        usable: &dyn Fn(&Target) -> bool,
    ) -> Option<Arc<Target>> {
        // A poisoned lock only means another pick panicked mid-update; the scores are still
        // plain integers, at worst slightly unfair for one cycle.
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if current.len() != targets.len() {
            current.resize(targets.len(), 0);
        }
        let mut total: i64 = 0;
        let mut best: Option<(usize, i64)> = None;
        for (i, (t, score)) in targets.iter().zip(current.iter_mut()).enumerate() {
            if !usable(t) {
                // Skipped targets keep their score, as in nginx.
                continue;
            }
            let w = i64::from(t.weight);
            *score += w;
            total += w;
            if best.is_none_or(|(_, s)| *score > s) {
                best = Some((i, *score));
            }
        }
        let (b, _) = best?;
        if let Some(score) = current.get_mut(b) {
            *score -= total;
        }
        targets.get(b).cloned()
    }
}

// ---------------------------------------------------------------------------------------------
// Least connections

/// Compares `(in_flight + 1) / weight` of two targets without division.
///
/// The `+ 1` makes an idle heavy target preferable to an idle light one, so weights matter
/// even at low concurrency.
fn cmp_load(a: &Target, b: &Target) -> CmpOrdering {
    let la = (a.in_flight.load(Ordering::Relaxed) as u128 + 1) * u128::from(b.weight);
    let lb = (b.in_flight.load(Ordering::Relaxed) as u128 + 1) * u128::from(a.weight);
    la.cmp(&lb)
}

fn least_connections(
    targets: &[Arc<Target>],
    usable: &dyn Fn(&Target) -> bool,
) -> Option<Arc<Target>> {
    let mut best: Option<&Arc<Target>> = None;
    let mut ties: u32 = 0;
    for t in targets {
        if !usable(t) {
            continue;
        }
        match best {
            None => {
                best = Some(t);
                ties = 1;
            }
            Some(b) => match cmp_load(t, b) {
                CmpOrdering::Less => {
                    best = Some(t);
                    ties = 1;
                }
                CmpOrdering::Equal => {
                    // Reservoir sampling: each of the k tied targets ends up chosen with
                    // probability 1/k, in one pass and without allocating.
                    ties = ties.saturating_add(1);
                    if fastrand::u32(0..ties) == 0 {
                        best = Some(t);
                    }
                }
                CmpOrdering::Greater => {}
            },
        }
    }
    best.cloned()
}

// ---------------------------------------------------------------------------------------------
// Power of two choices on EWMA latency

/// `ewma × (in_flight + 1)`; an unknown EWMA (no response yet) counts as 1 ns, so a new target
/// looks fast and gets traffic until its first responses give it a real estimate, while
/// several new targets are still told apart by their in-flight counts.
fn p2c_cost(t: &Target) -> u128 {
    let ewma = t.ewma_ns.load(Ordering::Relaxed).max(1);
    u128::from(ewma) * (t.in_flight.load(Ordering::Relaxed) as u128 + 1)
}

/// The `n`-th target `usable` accepts.
fn nth_usable<'a>(
    targets: &'a [Arc<Target>],
    usable: &dyn Fn(&Target) -> bool,
    n: usize,
) -> Option<&'a Arc<Target>> {
    targets.iter().filter(|t| usable(t)).nth(n)
}

fn p2c_ewma(targets: &[Arc<Target>], usable: &dyn Fn(&Target) -> bool) -> Option<Arc<Target>> {
    let count = targets.iter().filter(|t| usable(t)).count();
    if count == 0 {
        return None;
    }
    if count == 1 {
        return nth_usable(targets, usable, 0).cloned();
    }
    let i = fastrand::usize(0..count);
    let mut j = fastrand::usize(0..count - 1);
    if j >= i {
        j += 1;
    }
    // Health may flip between the counting pass and these; fall back to whatever is left.
    let (a, b) = match (
        nth_usable(targets, usable, i),
        nth_usable(targets, usable, j),
    ) {
        (Some(a), Some(b)) => (a, b),
        (Some(one), None) | (None, Some(one)) => return Some(one.clone()),
        (None, None) => return nth_usable(targets, usable, 0).cloned(),
    };
    // cost(a) / w(a) vs cost(b) / w(b), cross-multiplied to stay in integers.
    let ca = p2c_cost(a) * u128::from(b.weight);
    let cb = p2c_cost(b) * u128::from(a.weight);
    let winner = match ca.cmp(&cb) {
        CmpOrdering::Less => a,
        CmpOrdering::Greater => b,
        CmpOrdering::Equal => {
            if fastrand::bool() {
                a
            } else {
                b
            }
        }
    };
    Some(winner.clone())
}

// ---------------------------------------------------------------------------------------------
// Consistent hashing

/// A stable 64-bit hash: FNV-1a over the bytes, then the murmur3 finaliser.
///
/// It must give the same value on every node and every run (so a cluster agrees on who owns a
/// key), hence no randomly seeded hasher. FNV-1a alone mixes similar short keys (`10.0.0.1-7`,
/// `10.0.0.1-8`) poorly, which clusters virtual nodes; the finaliser spreads them.
pub(crate) fn stable_hash(parts: &[&[u8]]) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = FNV_OFFSET;
    for part in parts {
        for &byte in *part {
            h ^= u64::from(byte);
            h = h.wrapping_mul(FNV_PRIME);
        }
        // Separator so that ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(FNV_PRIME);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// Where the consistent-hash key comes from.
enum KeySource {
    ClientIp,
    Path,
    /// `None` when the configured name is not a valid header name: always falls back.
    Header(Option<HeaderName>),
    Cookie(String),
}

impl KeySource {
    fn new(on: &HashOn) -> Self {
        match on {
            HashOn::ClientIp => Self::ClientIp,
            HashOn::Path => Self::Path,
            HashOn::Header(name) => Self::Header(HeaderName::from_bytes(name.as_bytes()).ok()),
            HashOn::Cookie(name) => Self::Cookie(name.clone()),
        }
    }

    /// The hash of this request's key; a missing header or cookie hashes the client IP, so
    /// anonymous clients are still sticky and spread out.
    fn key_hash(&self, input: &SelectInput<'_>) -> u64 {
        let value: Option<&[u8]> = match self {
            Self::ClientIp => None,
            Self::Path => Some(input.path.as_bytes()),
            Self::Header(name) => name
                .as_ref()
                .and_then(|n| input.headers.get(n))
                .map(|v| v.as_bytes()),
            Self::Cookie(name) => cookie_value(input.headers, name),
        };
        match value {
            // The tag keeps a header value equal to an IP's bytes from colliding with it.
            Some(v) => stable_hash(&[b"v", v]),
            None => ip_hash(input.client_ip),
        }
    }
}

fn ip_hash(ip: IpAddr) -> u64 {
    // Canonical form so a v4 client seen through a v6 socket (::ffff:a.b.c.d) stays put.
    match ip.to_canonical() {
        IpAddr::V4(v4) => stable_hash(&[b"ip", &v4.octets()]),
        IpAddr::V6(v6) => stable_hash(&[b"ip", &v6.octets()]),
    }
}

/// The value of cookie `name` in the request's `Cookie` header(s), quotes stripped.
fn cookie_value<'h>(headers: &'h http::HeaderMap, name: &str) -> Option<&'h [u8]> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            let (k, v) = (pair.get(..eq)?, pair.get(eq + 1..)?);
            if k.trim_ascii() != name.as_bytes() {
                return None;
            }
            let v = v.trim_ascii();
            let v = v
                .strip_prefix(b"\"")
                .and_then(|v| v.strip_suffix(b"\""))
                .unwrap_or(v);
            Some(v)
        })
}

/// A hash ring: sorted `(point, target index)` pairs.
struct Ring {
    points: Vec<(u64, u32)>,
    /// Targets that own at least one point; the clockwise walk stops once all are rejected.
    owners: usize,
}

impl Ring {
    fn new(targets: &[Arc<Target>]) -> Self {
        let total_weight: u64 = targets.iter().map(|t| u64::from(t.weight)).sum();
        // Scale so the ring never exceeds MAX_RING_POINTS while keeping shares proportional.
        let per_weight = if total_weight == 0 {
            0.0
        } else {
            (VNODES_PER_WEIGHT as f64).min(MAX_RING_POINTS as f64 / total_weight as f64)
        };
        let mut points = Vec::new();
        let mut owners = 0;
        for (i, t) in targets.iter().enumerate() {
            let Ok(index) = u32::try_from(i) else { break };
            if t.weight == 0 {
                continue;
            }
            let vnodes = ((f64::from(t.weight) * per_weight).round() as u64).max(1);
            owners += 1;
            // Points derive from the address only, not the position in the list, so adding
            // or removing another target leaves this one's points where they were.
            let addr = t.addr.to_string();
            for v in 0..vnodes {
                points.push((stable_hash(&[addr.as_bytes(), &v.to_le_bytes()]), index));
            }
        }
        points.sort_unstable();
        Self { points, owners }
    }

    fn pick(
        &self,
        targets: &[Arc<Target>],
        key: u64,
        usable: &dyn Fn(&Target) -> bool,
    ) -> Option<Arc<Target>> {
        let n = self.points.len();
        if n == 0 {
            return None;
        }
        let start = self.points.partition_point(|&(p, _)| p < key);
        // Only allocated once the owner is unusable (the rare path), to avoid asking
        // `usable` again for each of a down target's many virtual nodes.
        let mut rejected: Option<Vec<bool>> = None;
        let mut rejected_count = 0;
        for step in 0..n {
            let Some(&(_, index)) = self.points.get((start + step) % n) else {
                continue;
            };
            let index = index as usize;
            let Some(t) = targets.get(index) else {
                continue;
            };
            if rejected
                .as_ref()
                .is_some_and(|r| r.get(index).copied().unwrap_or(true))
            {
                continue;
            }
            if usable(t) {
                return Some(t.clone());
            }
            let r = rejected.get_or_insert_with(|| vec![false; targets.len()]);
            if let Some(slot) = r.get_mut(index) {
                *slot = true;
            }
            rejected_count += 1;
            if rejected_count >= self.owners {
                break;
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::{Ipv4Addr, SocketAddr};

    use http::HeaderMap;

    use super::*;

    fn targets(weights: &[u32]) -> Vec<Arc<Target>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let addr = SocketAddr::from(([10, 0, 0, i as u8 + 1], 8080));
                Arc::new(Target::new(addr, format!("t{i}"), 8080, w))
            })
            .collect()
    }

    fn input<'a>(headers: &'a HeaderMap, ip: [u8; 4], path: &'a str) -> SelectInput<'a> {
        SelectInput {
            client_ip: IpAddr::V4(Ipv4Addr::from(ip)),
            path,
            headers,
        }
    }

    fn index_of(ts: &[Arc<Target>], t: &Arc<Target>) -> usize {
        ts.iter().position(|x| Arc::ptr_eq(x, t)).unwrap()
    }

    fn all(_: &Target) -> bool {
        true
    }

    fn counts(
        ts: &[Arc<Target>],
        b: &Balancer,
        n: usize,
        usable: &dyn Fn(&Target) -> bool,
    ) -> Vec<usize> {
        let h = HeaderMap::new();
        let mut c = vec![0; ts.len()];
        for _ in 0..n {
            let t = b.pick(ts, &input(&h, [1, 2, 3, 4], "/"), usable).unwrap();
            c[index_of(ts, &t)] += 1;
        }
        c
    }

    #[test]
    fn wrr_follows_weights() {
        let ts = targets(&[1, 2, 5]);
        let b = Balancer::new(&LoadBalancer::RoundRobin, &ts);
        let c = counts(&ts, &b, 8000, &all);
        for (got, want) in c.iter().zip([1000.0, 2000.0, 5000.0]) {
            assert!((*got as f64 - want).abs() <= want * 0.03, "{c:?}");
        }
    }

    #[test]
    fn wrr_is_smooth() {
        let ts = targets(&[5, 1, 1]);
        let b = Balancer::new(&LoadBalancer::RoundRobin, &ts);
        let h = HeaderMap::new();
        let seq: Vec<usize> = (0..700)
            .map(|_| {
                index_of(
                    &ts,
                    &b.pick(&ts, &input(&h, [1, 1, 1, 1], "/"), &all).unwrap(),
                )
            })
            .collect();
        // Never more of the heavy target in a row than its weight...
        let mut run = 0;
        let mut max_run = 0;
        for &i in &seq {
            run = if i == 0 { run + 1 } else { 0 };
            max_run = max_run.max(run);
        }
        assert!(max_run <= 5, "run of {max_run}: {seq:?}");
        // ...and every window of one cycle holds exactly the weights.
        for w in seq.windows(7) {
            let mut c = [0; 3];
            for &i in w {
                c[i] += 1;
            }
            assert_eq!(c, [5, 1, 1], "{w:?}");
        }
    }

    #[test]
    fn wrr_skips_unusable_and_keeps_proportions() {
        let ts = targets(&[1, 2, 5, 0]);
        let b = Balancer::new(&LoadBalancer::RoundRobin, &ts);
        let skip_heavy = |t: &Target| t.addr.ip() != IpAddr::V4(Ipv4Addr::new(10, 0, 0, 3));
        let c = counts(&ts, &b, 3000, &skip_heavy);
        assert_eq!(c[2], 0);
        assert_eq!(c[3], 0, "weight 0 is drained");
        assert!((c[1] as f64 / c[0] as f64 - 2.0).abs() < 0.1, "{c:?}");
        assert!(
            b.pick(&ts, &input(&HeaderMap::new(), [1, 1, 1, 1], "/"), &|_| {
                false
            })
            .is_none()
        );
        assert!(
            b.pick(&[], &input(&HeaderMap::new(), [1, 1, 1, 1], "/"), &all)
                .is_none()
        );
    }

    #[test]
    fn least_connections_prefers_least_loaded() {
        let ts = targets(&[1, 1, 1]);
        ts[0].in_flight.store(5, Ordering::Relaxed);
        ts[1].in_flight.store(1, Ordering::Relaxed);
        ts[2].in_flight.store(3, Ordering::Relaxed);
        let b = Balancer::new(&LoadBalancer::LeastConnections, &ts);
        assert_eq!(counts(&ts, &b, 200, &all), vec![0, 200, 0]);

        // Relative to weight: 4 in flight on weight 4 beats 2 on weight 1.
        let ts = targets(&[4, 1]);
        ts[0].in_flight.store(4, Ordering::Relaxed);
        ts[1].in_flight.store(2, Ordering::Relaxed);
        let b = Balancer::new(&LoadBalancer::LeastConnections, &ts);
        assert_eq!(counts(&ts, &b, 100, &all), vec![100, 0]);
    }

    #[test]
    fn least_connections_breaks_ties_at_random() {
        let ts = targets(&[1, 1, 1]);
        ts[0].in_flight.store(2, Ordering::Relaxed);
        let b = Balancer::new(&LoadBalancer::LeastConnections, &ts);
        let c = counts(&ts, &b, 4000, &all);
        assert_eq!(c[0], 0);
        assert!(c[1] > 1500 && c[2] > 1500, "{c:?}");
    }

    #[test]
    fn p2c_prefers_lower_latency_and_fewer_in_flight() {
        let ts = targets(&[1, 1, 1, 1]);
        ts[0].ewma_ns.store(1_000_000, Ordering::Relaxed);
        for t in &ts[1..] {
            t.ewma_ns.store(20_000_000, Ordering::Relaxed);
        }
        let b = Balancer::new(&LoadBalancer::P2cEwma, &ts);
        let c = counts(&ts, &b, 6000, &all);
        // The fast target wins every pair it is drawn in: 1/2 of picks for 4 targets.
        assert!(c[0] > 2400, "{c:?}");
        assert!(
            c[1..].iter().all(|&x| x > 600),
            "others still get traffic: {c:?}"
        );

        let ts = targets(&[1, 1, 1, 1]);
        for t in &ts {
            t.ewma_ns.store(5_000_000, Ordering::Relaxed);
            t.in_flight.store(10, Ordering::Relaxed);
        }
        ts[3].in_flight.store(0, Ordering::Relaxed);
        let b = Balancer::new(&LoadBalancer::P2cEwma, &ts);
        let c = counts(&ts, &b, 6000, &all);
        assert!(c[3] > 2400, "{c:?}");
    }

    #[test]
    fn p2c_gives_new_targets_traffic_and_respects_usable() {
        let ts = targets(&[1, 1, 1]);
        ts[0].ewma_ns.store(1_000_000, Ordering::Relaxed);
        ts[1].ewma_ns.store(1_000_000, Ordering::Relaxed);
        // ts[2] has no estimate yet.
        let b = Balancer::new(&LoadBalancer::P2cEwma, &ts);
        let c = counts(&ts, &b, 3000, &all);
        assert!(c[2] > 1500, "{c:?}");
        let not_new = |t: &Target| t.addr.ip() != IpAddr::V4(Ipv4Addr::new(10, 0, 0, 3));
        let c = counts(&ts, &b, 1000, &not_new);
        assert_eq!(c[2], 0);
        let only_first = |t: &Target| t.addr.ip() == IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(counts(&ts, &b, 50, &only_first), vec![50, 0, 0]);
    }

    fn header_map(name: &str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
        h
    }

    fn hash_header() -> LoadBalancer {
        LoadBalancer::ConsistentHash {
            hash_on: HashOn::Header("x-user".into()),
        }
    }

    /// Owner address of each of `n` keys hashed on the `x-user` header.
    fn owners(ts: &[Arc<Target>], n: usize) -> Vec<SocketAddr> {
        let b = Balancer::new(&hash_header(), ts);
        (0..n)
            .map(|k| {
                let h = header_map("x-user", &format!("user-{k}"));
                b.pick(ts, &input(&h, [9, 9, 9, 9], "/"), &all)
                    .unwrap()
                    .addr
            })
            .collect()
    }

    #[test]
    fn consistent_hash_is_sticky() {
        let ts = targets(&[1, 1, 1, 1, 1]);
        let a = owners(&ts, 1000);
        let b = owners(&ts, 1000);
        assert_eq!(a, b);
        // Built from the same addresses in another order: same owners.
        let mut rev = ts.clone();
        rev.reverse();
        assert_eq!(owners(&rev, 1000), a);
    }

    #[test]
    fn consistent_hash_remaps_about_one_nth_on_removal() {
        let ts = targets(&[1; 10]);
        let before = owners(&ts, 20_000);
        let removed = ts[4].addr;
        let fewer: Vec<_> = ts.iter().filter(|t| t.addr != removed).cloned().collect();
        let after = owners(&fewer, 20_000);
        let mut moved = 0;
        for (b, a) in before.iter().zip(&after) {
            if b != a {
                moved += 1;
                assert_eq!(*b, removed, "only the removed target's keys move");
            }
        }
        let frac = moved as f64 / 20_000.0;
        assert!((0.05..0.17).contains(&frac), "moved {frac}");
    }

    #[test]
    fn consistent_hash_follows_weights() {
        let ts = targets(&[1, 2, 3, 4]);
        let mut c: HashMap<SocketAddr, usize> = HashMap::new();
        for a in owners(&ts, 50_000) {
            *c.entry(a).or_default() += 1;
        }
        for t in &ts {
            let share = c[&t.addr] as f64 / 50_000.0;
            let want = f64::from(t.weight) / 10.0;
            assert!(
                (share - want).abs() < want * 0.3,
                "{}: {share} vs {want}",
                t.addr
            );
        }
    }

    #[test]
    fn consistent_hash_walks_past_unusable_owner() {
        let ts = targets(&[1, 1, 1, 1]);
        let b = Balancer::new(&hash_header(), &ts);
        let before = owners(&ts, 2000);
        let down = ts[1].addr;
        let up = |t: &Target| t.addr != down;
        for (k, owner) in before.iter().enumerate() {
            let h = header_map("x-user", &format!("user-{k}"));
            let got = b
                .pick(&ts, &input(&h, [9, 9, 9, 9], "/"), &up)
                .unwrap()
                .addr;
            assert_ne!(got, down);
            if *owner != down {
                assert_eq!(got, *owner, "keys of healthy targets stay");
            }
            // Deterministic fallback: the same key lands on the same next target.
            let again = b
                .pick(&ts, &input(&h, [9, 9, 9, 9], "/"), &up)
                .unwrap()
                .addr;
            assert_eq!(got, again);
        }
        assert!(
            b.pick(&ts, &input(&HeaderMap::new(), [9, 9, 9, 9], "/"), &|_| {
                false
            })
            .is_none()
        );
    }

    #[test]
    fn consistent_hash_key_sources() {
        let ts = targets(&[1; 8]);
        let by = |on: HashOn| Balancer::new(&LoadBalancer::ConsistentHash { hash_on: on }, &ts);
        let pick = |b: &Balancer, h: &HeaderMap, ip: [u8; 4], path: &str| {
            b.pick(&ts, &input(h, ip, path), &all).unwrap().addr
        };
        let none = HeaderMap::new();

        // Cookie: same session from different IPs and paths → same target.
        let cookie = by(HashOn::Cookie("session".into()));
        let jar = header_map("cookie", "theme=dark; session=\"abc123\"; lang=en");
        let first = pick(&cookie, &jar, [1, 1, 1, 1], "/a");
        for ip in 0..50u8 {
            assert_eq!(pick(&cookie, &jar, [2, 2, 2, ip], "/b"), first);
        }
        // Different sessions spread.
        let spread: std::collections::HashSet<_> = (0..200)
            .map(|i| {
                pick(
                    &cookie,
                    &header_map("cookie", &format!("session=s{i}")),
                    [1, 1, 1, 1],
                    "/",
                )
            })
            .collect();
        assert!(spread.len() >= 6, "{spread:?}");
        // Missing cookie (or no Cookie header) → client IP.
        let other = header_map("cookie", "theme=dark");
        for ip in 0..50u8 {
            let a = pick(&cookie, &other, [3, 3, 3, ip], "/x");
            assert_eq!(a, pick(&cookie, &none, [3, 3, 3, ip], "/y"));
            let by_ip = by(HashOn::ClientIp);
            assert_eq!(a, pick(&by_ip, &none, [3, 3, 3, ip], "/z"));
        }

        // Path.
        let path = by(HashOn::Path);
        let p = pick(&path, &none, [1, 1, 1, 1], "/items/42");
        for ip in 0..50u8 {
            assert_eq!(pick(&path, &none, [5, 5, ip, 5], "/items/42"), p);
        }

        // Header missing → client IP; invalid header name never panics.
        let hdr = by(HashOn::Header("x-tenant".into()));
        let by_ip = by(HashOn::ClientIp);
        assert_eq!(
            pick(&hdr, &none, [7, 7, 7, 7], "/"),
            pick(&by_ip, &none, [7, 7, 7, 7], "/")
        );
        let bad = by(HashOn::Header("not a header".into()));
        assert_eq!(
            pick(&bad, &none, [7, 7, 7, 7], "/"),
            pick(&by_ip, &none, [7, 7, 7, 7], "/")
        );

        // IPv4 seen as v4-mapped IPv6 hashes like the IPv4 address.
        let mapped = SelectInput {
            client_ip: IpAddr::V6(Ipv4Addr::new(7, 7, 7, 7).to_ipv6_mapped()),
            path: "/",
            headers: &none,
        };
        assert_eq!(
            by_ip.pick(&ts, &mapped, &all).unwrap().addr,
            pick(&by_ip, &none, [7, 7, 7, 7], "/")
        );
    }

    #[test]
    fn ring_size_is_bounded_and_proportional() {
        let ts = targets(&[1, 1000, 0]);
        let ring = Ring::new(&ts);
        assert!(ring.points.len() as u64 <= MAX_RING_POINTS + 2);
        assert_eq!(ring.owners, 2);
        let light = ring.points.iter().filter(|p| p.1 == 0).count();
        assert!((1..200).contains(&light), "{light}");
        assert!(
            ring.points.iter().all(|p| p.1 != 2),
            "weight 0 owns nothing"
        );
    }

    #[test]
    fn cookie_parsing() {
        let h = header_map("cookie", " a=1 ;b = two; c=\"q\"; d=");
        assert_eq!(cookie_value(&h, "a"), Some(&b"1"[..]));
        assert_eq!(cookie_value(&h, "b"), Some(&b"two"[..]));
        assert_eq!(cookie_value(&h, "c"), Some(&b"q"[..]));
        assert_eq!(cookie_value(&h, "d"), Some(&b""[..]));
        assert_eq!(cookie_value(&h, "e"), None);
        let mut two = HeaderMap::new();
        two.append("cookie", "x=1".parse().unwrap());
        two.append("cookie", "y=2".parse().unwrap());
        assert_eq!(cookie_value(&two, "y"), Some(&b"2"[..]));
    }
}
