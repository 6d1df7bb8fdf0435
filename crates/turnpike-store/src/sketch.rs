//! The latency sketch stored with every analytics rollup row: a log-bucket quantile sketch
//! in the manner of DDSketch (Masson et al., VLDB 2019), written here rather than taken from
//! a crate because its serialised form is a column of the store and must stay readable by
//! every future version: a tiny JSON document we define (`{"z":zeros,"o":offset,"b":[counts]}`)
//! is a format we control, where a crate's serde derive could change under a version bump.
//!
//! A value `v >= 1` (microseconds) goes to bucket `ceil(log_γ v)` with `γ = (1+α)/(1-α)`;
//! every value of a bucket is within relative error `α` of the bucket's representative
//! `2γ^i/(γ+1)`, so every quantile answered is within `α` (relative) of the exact value at
//! that rank. Sketches merge by adding bucket counts, exactly: a merged sketch is the sketch
//! of all the values, which is what makes minute → hour → day downsampling exact.
//!
//! Memory and size are bounded: values are clamped to `[1, 2^40]` µs (12.7 days), so a sketch
//! never has more than about 1,400 buckets, and realistic ones (1 ms to 10 s) about 460.

use serde::{Deserialize, Serialize};

/// The relative accuracy of every quantile: 1 %.
pub const RELATIVE_ACCURACY: f64 = 0.01;
/// The largest value tracked (µs); larger ones count as this.
const MAX_VALUE: u64 = 1 << 40;

fn gamma() -> f64 {
    (1.0 + RELATIVE_ACCURACY) / (1.0 - RELATIVE_ACCURACY)
}

/// The bucket of `value` (clamped to `[1, MAX_VALUE]`) by its definition, `ceil(log_γ v)`:
/// what every stored sketch was counted with. At most about 1,400, so the cast cannot
/// truncate.
#[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
fn bucket_of(value: u64) -> i32 {
    let v = value.clamp(1, MAX_VALUE) as f64;
    (v.ln() / gamma().ln()).ceil() as i32
}

/// Where the buckets begin, for [`LatencySketch::index`].
struct Buckets {
    /// For each bucket from 0 to that of [`MAX_VALUE`], the smallest value [`bucket_of`]
    /// puts in it or in a later one. Made from `bucket_of` itself (which never decreases as
    /// the value grows), so a lookup in it agrees with `bucket_of` on every value, to the
    /// last rounding.
    starts: Vec<u64>,
    /// Buckets per doubling of the value: `ln 2 / ln γ`.
    per_log2: f64,
}

fn buckets() -> &'static Buckets {
    static BUCKETS: std::sync::LazyLock<Buckets> = std::sync::LazyLock::new(|| {
        let last = usize::try_from(bucket_of(MAX_VALUE)).unwrap_or(0);
        let mut starts = vec![1u64; last + 1];
        let mut prev = 1u64;
        for (i, start) in starts.iter_mut().enumerate().skip(1) {
            let want = i32::try_from(i).unwrap_or(i32::MAX);
            // Bucket i holds the values in (γ^(i-1), γ^i]: start from the first integer past
            // γ^(i-1), then step to where `bucket_of` itself says the bucket begins (a value
            // or two away, from rounding).
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let guess = (gamma().powi(want - 1).floor() as u64).saturating_add(1);
            let mut v = guess.clamp(prev, MAX_VALUE);
            while v > prev && bucket_of(v - 1) >= want {
                v -= 1;
            }
            while v < MAX_VALUE && bucket_of(v) < want {
                v += 1;
            }
            *start = v;
            prev = v;
        }
        Buckets {
            starts,
            per_log2: std::f64::consts::LN_2 / gamma().ln(),
        }
    });
    &BUCKETS
}

/// A mergeable quantile sketch of latencies in microseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencySketch {
    /// Values below 1 µs.
    #[serde(rename = "z", default)]
    zeros: u64,
    /// Bucket index of `bins[0]`.
    #[serde(rename = "o", default)]
    offset: i32,
    /// Counts of consecutive buckets from `offset`.
    #[serde(rename = "b", default)]
    bins: Vec<u64>,
}

impl LatencySketch {
    /// An empty sketch.
    pub fn new() -> Self {
        Self::default()
    }

    /// The bucket of `value`: [`bucket_of`], read from a table of where each bucket starts
    /// (the same answer for every value; `ln` was most of what adding a value cost).
    fn index(value: u64) -> i32 {
        let v = value.clamp(1, MAX_VALUE);
        let Buckets { starts, per_log2 } = buckets();
        // log2(v) from the float's exponent and mantissa, off by under 0.09, so the guess is
        // at most a few buckets from the answer; the table walks it there.
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let mut i = {
            let bits = (v as f64).to_bits();
            let log2 =
                ((bits >> 52) as f64 - 1023.0) + (bits & ((1 << 52) - 1)) as f64 / 2f64.powi(52);
            ((log2 * per_log2) as usize).min(starts.len() - 1)
        };
        while i + 1 < starts.len() && starts[i + 1] <= v {
            i += 1;
        }
        // The linear log2 is never above the true one, so this guard does not run today.
        while i > 0 && starts[i] > v {
            i -= 1;
        }
        i32::try_from(i).unwrap_or(i32::MAX)
    }

    fn add_to(&mut self, index: i32, count: u64) {
        if self.bins.is_empty() {
            self.offset = index;
            self.bins.push(count);
            return;
        }
        if index < self.offset {
            let grow = usize::try_from(self.offset - index).unwrap_or(0);
            let mut bins = vec![0; grow];
            bins.append(&mut self.bins);
            self.bins = bins;
            self.offset = index;
        }
        let at = usize::try_from(index - self.offset).unwrap_or(0);
        if at >= self.bins.len() {
            self.bins.resize(at + 1, 0);
        }
        self.bins[at] += count;
    }

    /// Records one value (µs).
    pub fn add(&mut self, value_us: u64) {
        if value_us == 0 {
            self.zeros += 1;
        } else {
            self.add_to(Self::index(value_us), 1);
        }
    }

    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &Self) {
        self.zeros += other.zeros;
        for (i, count) in other.bins.iter().enumerate() {
            if *count > 0 {
                let index = other.offset + i32::try_from(i).unwrap_or(i32::MAX);
                self.add_to(index, *count);
            }
        }
    }

    /// How many values it holds.
    pub fn count(&self) -> u64 {
        self.zeros + self.bins.iter().sum::<u64>()
    }

    /// The value at quantile `q` (0 to 1) within the relative accuracy, in microseconds;
    /// `None` when empty. The rank is `floor(q × (count − 1))`, the lower nearest rank.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let q = q.clamp(0.0, 1.0);
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let rank = (q * (n - 1) as f64).floor() as u64;
        if rank < self.zeros {
            return Some(0.0);
        }
        let mut seen = self.zeros;
        let g = gamma();
        for (i, count) in self.bins.iter().enumerate() {
            seen += count;
            if seen > rank {
                let index = self.offset + i32::try_from(i).unwrap_or(i32::MAX);
                return Some(2.0 * g.powi(index) / (g + 1.0));
            }
        }
        None
    }

    /// The serialised form stored in the `sketch` column.
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned())
    }

    /// Reads a stored sketch; an unreadable one reads as empty (a corrupt row must not take
    /// the analytics API down with it).
    pub fn from_text(text: &str) -> Self {
        serde_json::from_str(text).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn exact(sorted: &[u64], q: f64) -> f64 {
        let rank = (q * (sorted.len() - 1) as f64).floor() as usize;
        sorted[rank] as f64
    }

    #[test]
    fn the_bucket_table_agrees_with_the_formula_on_every_value() {
        // Every value up to 2^20 µs (about a second), then spread up past the clamp, and
        // both sides of every bucket's start.
        let spread = (0..200_000u64)
            .map(|i| i.wrapping_mul(i).wrapping_mul(2_654_435_761) % (MAX_VALUE + 1000));
        for v in (0..=1 << 20)
            .chain(spread)
            .chain([u64::MAX, MAX_VALUE, MAX_VALUE + 1])
        {
            assert_eq!(LatencySketch::index(v), bucket_of(v), "value {v}");
        }
        for &start in &buckets().starts {
            for v in [start.saturating_sub(1), start, start + 1] {
                assert_eq!(LatencySketch::index(v), bucket_of(v), "value {v}");
            }
        }
        assert_eq!(LatencySketch::index(1), 0);
        assert_eq!(LatencySketch::index(2), 35);
    }

    #[test]
    fn quantiles_are_within_the_relative_accuracy_and_merge_exactly() {
        let mut values: Vec<u64> = (0..5000u64)
            .map(|i| (i * i * 7919) % 3_000_000 + 1)
            .collect();
        let mut whole = LatencySketch::new();
        let mut a = LatencySketch::new();
        let mut b = LatencySketch::new();
        for (i, v) in values.iter().enumerate() {
            whole.add(*v);
            if i % 3 == 0 { a.add(*v) } else { b.add(*v) }
        }
        a.merge(&b);
        assert_eq!(a, whole);
        values.sort_unstable();
        for q in [0.0, 0.5, 0.9, 0.95, 0.99, 1.0] {
            let got = whole.quantile(q).unwrap();
            let want = exact(&values, q);
            assert!(
                (got - want).abs() <= want * RELATIVE_ACCURACY + 1e-9,
                "q={q}: {got} vs {want}"
            );
        }
        let back = LatencySketch::from_text(&whole.to_text());
        assert_eq!(back, whole);
        assert_eq!(LatencySketch::new().quantile(0.5), None);
        let mut z = LatencySketch::new();
        z.add(0);
        z.add(u64::MAX);
        assert_eq!(z.quantile(0.0), Some(0.0));
        assert!(z.quantile(1.0).unwrap() > 1e12);
    }
}
