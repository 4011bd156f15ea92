//! The month partitions of `user_logins` and `login_vault` (migration 0017): a login is
//! stored only in its month's partitions, so each month is added before its first login,
//! through the key admin's door `vault_add_month`.

use sqlx::PgPool;
use time::Date;

use crate::vault::retention::next_month;

/// Adds the partitions of `month`'s month; false if it had them.
pub async fn add_month(pool: &PgPool, month: Date) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT vault_add_month($1)")
        .bind(month)
        .fetch_one(pool)
        .await
}

/// Adds the partitions of `from`'s month and of the `ahead` months after it; answers each
/// month (its first day) and whether it was added now.
pub async fn add_months_ahead(
    pool: &PgPool,
    from: Date,
    ahead: u32,
) -> Result<Vec<(Date, bool)>, sqlx::Error> {
    let mut month = from.replace_day(1).expect("every month has a first day");
    let mut months = Vec::new();
    for _ in 0..=ahead {
        months.push((month, add_month(pool, month).await?));
        month = next_month(month);
    }
    Ok(months)
}
