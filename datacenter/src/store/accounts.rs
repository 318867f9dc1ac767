//! The portal's accounts in SQLite (one row per name, the account as JSON), and operators'
//! notes, which are audit events.

use super::*;

impl SqliteStore {
    pub(super) fn accounts_in(&self) -> Result<Vec<Account>, StoreError> {
        let mut statement = self
            .conn
            .prepare("SELECT name, account FROM accounts ORDER BY name")
            .map_err(db("reading the accounts"))?;
        let rows = statement
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(db("reading the accounts"))?;
        let mut accounts = Vec::new();
        for row in rows {
            let (name, json) = row.map_err(db("reading the accounts"))?;
            let account = serde_json::from_str(&json).map_err(|e| {
                StoreError::NotAllowed(format!("the account {name} is damaged: {e}"))
            })?;
            accounts.push(account);
        }
        Ok(accounts)
    }

    pub(super) fn put_account_in(&mut self, account: &Account) -> Result<(), StoreError> {
        let json = serde_json::to_string(account)
            .map_err(|e| StoreError::NotAllowed(format!("the account cannot be stored: {e}")))?;
        self.conn
            .execute(
                "INSERT INTO accounts (name, account) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET account = ?2",
                params![account.name, json],
            )
            .map(drop)
            .map_err(db("writing an account"))
    }

    pub(super) fn remove_account_in(&mut self, name: &str) -> Result<bool, StoreError> {
        self.conn
            .execute("DELETE FROM accounts WHERE name = ?1", [name])
            .map(|n| n > 0)
            .map_err(db("removing an account"))
    }

    pub(super) fn note_in(
        &mut self,
        pair: &str,
        actor: &str,
        text: &str,
        now: Millis,
    ) -> Result<(), StoreError> {
        check_note(text)?;
        let tx = begin(&mut self.conn)?;
        let pair_id: i64 = tx
            .query_row(
                "SELECT id FROM pairs WHERE name = ?1 AND retired_at IS NULL",
                [pair],
                |r| r.get(0),
            )
            .optional()
            .map_err(db("reading the pair"))?
            .ok_or_else(|| StoreError::NotAllowed(format!("there is no pair called {pair:?}")))?;
        log(
            &tx,
            now,
            Some(pair_id),
            None,
            "note",
            (None, None),
            actor,
            text,
        )?;
        tx.commit().map_err(db("committing"))
    }
}
