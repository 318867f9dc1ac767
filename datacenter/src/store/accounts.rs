//! In SQLite: the portal's accounts (one row per name, the account as JSON), operators' notes
//! (audit events), the sites' CAs and the root's revocation list.

use super::*;

/// A note's text: 1 to 2,000 characters, no control characters but line breaks.
pub fn check_note(text: &str) -> Result<(), StoreError> {
    let length = text.chars().count();
    if !(1..=2000).contains(&length) || text.chars().any(|c| c.is_control() && c != '\n') {
        return Err(StoreError::NotAllowed(
            "a note is 1 to 2,000 characters of text".into(),
        ));
    }
    Ok(())
}

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

    pub(super) fn revocation_list_in(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.conn
            .query_row("SELECT crl FROM revocations WHERE id = 1", [], |r| r.get(0))
            .optional()
            .map_err(db("reading the revocation list"))
    }

    pub(super) fn set_revocation_list_in(
        &mut self,
        crl: &[u8],
        now: Millis,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO revocations (id, crl, changed_at) VALUES (1, ?1, ?2)
                 ON CONFLICT (id) DO UPDATE SET crl = ?1, changed_at = ?2",
                rusqlite::params![crl, now],
            )
            .map(drop)
            .map_err(db("writing the revocation list"))
    }

    pub(super) fn site_ca_in(&self, site: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.conn
            .query_row("SELECT cert FROM site_cas WHERE site = ?1", [site], |r| {
                r.get(0)
            })
            .optional()
            .map_err(db("reading a site's CA"))
    }

    pub(super) fn record_site_ca_in(
        &mut self,
        site: &str,
        cert: &[u8],
        now: Millis,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO site_cas (site, cert, issued_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (site) DO UPDATE SET cert = ?2, issued_at = ?3",
                rusqlite::params![site, cert, now],
            )
            .map(drop)
            .map_err(db("recording a site's CA"))
    }
}
