//! Expired idempotency records removed from the store. A record is kept `reply_ttl` after its
//! message settled (rule D7) and is invisible once that has run out, but a store whose records
//! do not expire by themselves (embedded, PostgreSQL; Redis keys carry a TTL) keeps the row:
//! every ask records one under its key (its own, or one made up), so without this a store grew
//! by a row per ask for ever. Every runtime purges, a client-only one too; two nodes' purges
//! race harmlessly, since a purge removes only what has expired.

use std::sync::Arc;
use std::time::Duration;

use super::Shared;

/// Most records removed by one store call; a full batch is followed at once by the next.
const BATCH: usize = 1000;

/// How often the expired records are removed, for a `reply_ttl`: twice per ttl, within a
/// tenth of a second and a minute.
fn every(reply_ttl: Duration) -> Duration {
    (reply_ttl / 2).clamp(Duration::from_millis(100), Duration::from_secs(60))
}

/// Removes expired records every [`every`] until the runtime shuts down.
pub(super) async fn purge_expired_records(shared: Arc<Shared>) {
    let every = every(shared.config.reply_ttl);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        loop {
            if shared.shutdown.is_cancelled() {
                return;
            }
            let r = shared.store.purge_expired(BATCH).await;
            // Its failures count toward the store's health; its successes do not clear a
            // failure, since a purge may write nothing (Redis's always, and most others').
            if let Err(e) = &r {
                shared.health.failed(e);
            }
            match r {
                Ok(n) if n as usize >= BATCH => tokio::task::yield_now().await,
                Ok(n) => {
                    if n > 0 {
                        tracing::debug!(records = n, "purged expired idempotency records");
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not purge expired idempotency records; trying again later");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purges_twice_per_ttl_within_bounds() {
        assert_eq!(
            every(Duration::from_millis(300)),
            Duration::from_millis(150)
        );
        assert_eq!(every(Duration::from_millis(50)), Duration::from_millis(100));
        assert_eq!(
            every(Duration::from_secs(24 * 3600)),
            Duration::from_secs(60)
        );
    }
}
