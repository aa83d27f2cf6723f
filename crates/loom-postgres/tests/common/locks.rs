//! Watching a statement of another session wait on a row lock (`pg_stat_activity`).

use std::time::Duration;

/// Whether a statement matching `query` (a LIKE pattern) comes to wait on a lock within 5 s.
pub async fn waits_on_a_lock(admin: &sqlx::PgPool, query: &str) -> bool {
    for _ in 0..500 {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE $1",
        )
        .bind(query)
        .fetch_one(admin)
        .await
        .expect("pg_stat_activity");
        if n > 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}
