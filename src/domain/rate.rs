//! A token bucket: at most `per_second` a second on average, `burst` at once.
//! Owns: how many events a tenant may send now, and how long until it may
//! send a refused batch. Pure: `now_ms` is an argument; time only moves
//! forward in it.

/// Tokens refill continuously at `per_second`, up to `burst`.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    at_ms: i64,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(per_second: u64, burst: u64, now_ms: i64) -> TokenBucket {
        TokenBucket {
            per_second: per_second as f64,
            burst: burst as f64,
            tokens: burst as f64,
            at_ms: now_ms,
        }
    }

    fn refill(&mut self, now_ms: i64) {
        let elapsed_ms = (now_ms - self.at_ms).max(0);
        self.tokens = (self.tokens + self.per_second * elapsed_ms as f64 / 1000.0).min(self.burst);
        self.at_ms = self.at_ms.max(now_ms);
    }

    /// Takes `n` tokens, or none and says in how many milliseconds `n` will
    /// be there (a batch larger than the burst never fits: `None`).
    pub fn take(&mut self, n: u64, now_ms: i64) -> Result<(), Option<u64>> {
        self.refill(now_ms);
        let wanted = n as f64;
        if wanted <= self.tokens {
            self.tokens -= wanted;
            return Ok(());
        }
        if wanted > self.burst || self.per_second <= 0.0 {
            return Err(None);
        }
        Err(Some(
            ((wanted - self.tokens) * 1000.0 / self.per_second).ceil() as u64,
        ))
    }

    /// Gives back tokens taken for a request that was then refused.
    pub fn give_back(&mut self, n: u64) {
        self.tokens = (self.tokens + n as f64).min(self.burst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_gives_its_burst_then_its_rate() {
        let mut bucket = TokenBucket::new(1_000, 2_000, 0);
        assert_eq!(bucket.take(2_000, 0), Ok(()));
        assert_eq!(bucket.take(1, 0), Err(Some(1)));
        assert_eq!(bucket.take(500, 0), Err(Some(500)));
        assert_eq!(bucket.take(500, 500), Ok(()));
        // never more than the burst, however long it waited
        assert_eq!(bucket.take(2_001, 1_000_000), Err(None));
        assert_eq!(bucket.take(2_000, 1_000_000), Ok(()));
        bucket.give_back(300);
        assert_eq!(bucket.take(300, 1_000_000), Ok(()));
        // a clock that steps back takes nothing away
        assert_eq!(bucket.take(1, 999_000), Err(Some(1)));
    }
}
