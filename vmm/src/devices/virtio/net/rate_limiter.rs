//! A token bucket per direction (bytes per second), off unless configured.
//!
//! The bucket holds at most [`TokenBucket::capacity`] bytes: a tenth of a
//! second at the configured rate, and never less than one largest frame, so
//! a slow limit still passes a 64 KiB GSO frame. A frame may take the bucket
//! below zero (its length is known only once it is read from the tap); the
//! direction then waits until the bucket is positive again, so over time
//! the rate holds.

use std::time::{Duration, Instant};

use super::defs::{MAX_FRAME_LEN, VNET_HDR_LEN};

#[derive(Debug)]
pub struct TokenBucket {
    rate: u64,
    capacity: i64,
    tokens: i64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(bytes_per_sec: u64) -> Self {
        Self::new_at(bytes_per_sec, Instant::now())
    }

    pub fn new_at(bytes_per_sec: u64, now: Instant) -> Self {
        let rate = bytes_per_sec.max(1);
        let floor = (MAX_FRAME_LEN + VNET_HDR_LEN) as u64;
        let capacity = (rate / 10).max(floor).min(i64::MAX as u64) as i64;
        TokenBucket {
            rate,
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    pub fn capacity(&self) -> i64 {
        self.capacity
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last);
        let add = (dt.as_nanos().saturating_mul(u128::from(self.rate)) / 1_000_000_000)
            .min(i64::MAX as u128) as i64;
        if add > 0 {
            self.tokens = self.tokens.saturating_add(add).min(self.capacity);
            // Only the time that bought whole bytes is spent.
            let spent = Duration::from_nanos(
                ((add as u128 * 1_000_000_000) / u128::from(self.rate)).min(u64::MAX as u128)
                    as u64,
            );
            self.last += spent.min(dt);
        }
    }

    /// None when a frame may go now; otherwise how long until one may.
    pub fn wait(&mut self, now: Instant) -> Option<Duration> {
        self.refill(now);
        if self.tokens > 0 {
            return None;
        }
        let need = (1 - self.tokens) as u128;
        let nanos = (need * 1_000_000_000).div_ceil(u128::from(self.rate));
        Some(
            Duration::from_nanos(nanos.min(u64::MAX as u128) as u64)
                .max(Duration::from_micros(100)),
        )
    }

    /// Spends `bytes` (which may take the bucket below zero).
    pub fn consume(&mut self, bytes: u64) {
        self.tokens = self
            .tokens
            .saturating_sub(bytes.min(i64::MAX as u64) as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bucket_passes_then_waits_for_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(1_000_000, t0);
        assert_eq!(b.capacity(), 100_000);
        assert_eq!(b.wait(t0), None);
        b.consume(150_000);
        // 50_000 bytes of debt at 1 MB/s: 50 ms.
        let w = b.wait(t0).unwrap();
        assert!(
            (Duration::from_millis(49)..=Duration::from_millis(51)).contains(&w),
            "{w:?}"
        );
        assert!(b.wait(t0 + Duration::from_millis(40)).is_some());
        assert_eq!(b.wait(t0 + Duration::from_millis(51)), None);
        // Idle time never fills past the capacity.
        assert_eq!(b.wait(t0 + Duration::from_secs(100)), None);
        assert_eq!(b.tokens, b.capacity());
    }

    #[test]
    fn a_slow_limit_still_passes_a_largest_frame() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(1, t0);
        assert!(b.capacity() >= (MAX_FRAME_LEN + VNET_HDR_LEN) as i64);
        assert_eq!(b.wait(t0), None);
        b.consume((MAX_FRAME_LEN + VNET_HDR_LEN) as u64);
        assert!(b.wait(t0).unwrap() >= Duration::from_secs(1));
    }

    #[test]
    fn the_rate_holds_over_many_frames() {
        // 10 MB/s for one simulated second of 1500-byte frames.
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(10_000_000, t0);
        let mut now = t0;
        let mut sent = 0u64;
        while now < t0 + Duration::from_secs(1) {
            match b.wait(now) {
                None => {
                    b.consume(1500);
                    sent += 1500;
                }
                Some(w) => now += w,
            }
        }
        // The rate plus the initial burst (a tenth of a second).
        assert!((10_000_000..=11_100_000).contains(&sent), "{sent}");
    }
}
