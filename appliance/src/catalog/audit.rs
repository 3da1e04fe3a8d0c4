//! The audit log: every deletion and forget, protection and lock change, policy, account and
//! rule change, maintenance run, refused destructive request and burst of failed logins, as a
//! hash chain in the catalog (and so, through the journal, in the packs).
//!
//! Entry `n` is stored at `audit/<n as 16 hex digits>` as JSON ([`Entry`]); it carries the hash
//! of entry `n - 1`'s stored bytes (`prev`; 64 zeros for entry 1), and `meta/audit_head` holds the
//! number and hash of the newest entry. [`verify`] then finds an entry that was edited (the next
//! entry's `prev` or the head no longer matches), removed (a gap), or moved (an entry stored at
//! another number than its own), and names it.
//!
//! Invariant (enforced by `Catalog::write`, the one writer): an entry is written in the same
//! synced batch as the change it records, and entries are numbered without gaps in the order the
//! catalog applied the changes.
//!
//! What the chain shows: that the log read is the log written, entry for entry, up to its head.
//! What it cannot: someone with write access to `catalog/` can write a whole new chain; the
//! journal's copy in the packs (encrypted under the repository key) and an exported head
//! (`audit verify` prints it) are what such a rewrite would have to match.

use serde::{Deserialize, Serialize};

/// Key prefix of the entries.
pub const PREFIX: &[u8] = b"audit/";
/// Key of the chain's head.
pub const HEAD: &[u8] = b"meta/audit_head";

/// The `prev` of the first entry.
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What happened to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Done,
    Refused,
}

/// One thing to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// `user@host`, `admin` (CLI or admin socket) or `maintenance`.
    pub actor: String,
    /// Dotted verb: `snapshot.delete`, `snapshot.forget`, `snapshot.protect`,
    /// `snapshot.unprotect`, `snapshot.lock`, `policy.set`, `policy.delete`, `user.add`,
    /// `user.set`, `user.delete`, `acl.add`, `acl.remove`, `acl.enable`, `maintenance.run`,
    /// `login.failures`, `step_up.failed`.
    pub action: String,
    /// What it was about (a snapshot id, a policy target, an identity, a rule id).
    pub target: String,
    pub outcome: Outcome,
    pub detail: String,
}

impl Event {
    #[must_use]
    pub fn done(actor: &str, action: &str, target: impl Into<String>) -> Self {
        Self {
            actor: actor.to_string(),
            action: action.to_string(),
            target: target.into(),
            outcome: Outcome::Done,
            detail: String::new(),
        }
    }

    #[must_use]
    pub fn refused(actor: &str, action: &str, target: impl Into<String>, why: &str) -> Self {
        Self {
            outcome: Outcome::Refused,
            detail: why.to_string(),
            ..Self::done(actor, action, target)
        }
    }

    #[must_use]
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }
}

/// An entry as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub seq: u64,
    pub time_us: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// Hex of the hash of the previous entry's stored bytes.
    pub prev: String,
}

/// The newest entry's number and hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
}

/// The key of entry `seq`.
#[must_use]
pub fn key(seq: u64) -> Vec<u8> {
    format!("audit/{seq:016x}").into_bytes()
}

/// The hash that links an entry's stored bytes into the chain.
#[must_use]
pub fn hash(stored: &[u8]) -> String {
    let mut h = blake3::Hasher::new_derive_key("coffer 2026 audit entry v1");
    h.update(stored);
    h.finalize().to_hex().to_string()
}

/// The ops that append `event` after `head` at `time_us`: the entry and the new head.
///
/// # Errors
/// A head that does not decode (the chain is broken: nothing is appended to it).
pub fn append_ops(
    head: Option<&[u8]>,
    event: &Event,
    time_us: i64,
) -> Result<Vec<super::journal::Op>, String> {
    let head: Option<Head> = head
        .map(|h| serde_json::from_slice(h).map_err(|e| format!("audit head: {e}")))
        .transpose()?;
    let (seq, prev) = match head {
        Some(h) => (h.seq + 1, h.hash),
        None => (1, GENESIS.to_string()),
    };
    let entry = Entry {
        seq,
        time_us,
        actor: event.actor.clone(),
        action: event.action.clone(),
        target: event.target.clone(),
        outcome: event.outcome,
        detail: event.detail.clone(),
        prev,
    };
    let stored = serde_json::to_vec(&entry).map_err(|e| e.to_string())?;
    let head = Head {
        seq,
        hash: hash(&stored),
    };
    Ok(vec![
        (key(seq), Some(stored)),
        (
            HEAD.to_vec(),
            Some(serde_json::to_vec(&head).map_err(|e| e.to_string())?),
        ),
    ])
}

/// What [`verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verified {
    /// Entries read.
    pub entries: u64,
    /// The head as stored (newest number and hash), if any.
    pub head: Option<Head>,
    /// Each problem, naming the entry.
    pub problems: Vec<String>,
}

/// Checks the chain: `entries` are the stored (key, value) pairs under [`PREFIX`] in key order,
/// `head` the stored head.
#[must_use]
pub fn verify(entries: &[(Vec<u8>, Vec<u8>)], head: Option<&[u8]>) -> Verified {
    let mut out = Verified {
        entries: entries.len() as u64,
        ..Verified::default()
    };
    let mut prev_hash = GENESIS.to_string();
    let mut expect = 1u64;
    let mut last = 0u64;
    for (k, v) in entries {
        let at = std::str::from_utf8(&k[PREFIX.len().min(k.len())..])
            .ok()
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            // Only the canonical spelling is an entry's key: another one sorts elsewhere.
            .filter(|n| key(*n) == *k);
        let Some(at) = at else {
            out.problems.push(format!(
                "key {:?} is not an audit entry number: an entry was stored under another name",
                String::from_utf8_lossy(k)
            ));
            continue;
        };
        if at < expect {
            out.problems.push(format!(
                "entry {at} is stored out of order or twice (after entry {})",
                expect - 1
            ));
            continue;
        }
        if at > expect {
            out.problems.push(if at == expect + 1 && expect > 1 {
                format!(
                    "entry {expect} is missing (removed): entry {at} follows entry {}",
                    expect - 1
                )
            } else if at == expect + 1 {
                format!("entry {expect} is missing (removed): the log starts at entry {at}")
            } else {
                format!("entries {expect} to {} are missing (removed)", at - 1)
            });
        }
        match serde_json::from_slice::<Entry>(v) {
            Err(e) => out
                .problems
                .push(format!("entry {at} was changed: it no longer decodes ({e})")),
            Ok(e) if e.seq != at => out.problems.push(format!(
                "entry {at} was moved: the entry stored there is entry {} (entries reordered)",
                e.seq
            )),
            Ok(e) if e.prev != prev_hash && at == expect => out.problems.push(if at == 1 {
                "entry 1 was changed: it does not start the chain".to_string()
            } else {
                format!(
                    "entry {} was changed after it was written (entry {at} recorded another hash for it)",
                    at - 1
                )
            }),
            Ok(_) => {}
        }
        prev_hash = hash(v);
        expect = at + 1;
        last = at;
    }
    match head.map(serde_json::from_slice::<Head>) {
        None if last > 0 => out
            .problems
            .push("the audit head is missing: the newest entries cannot be checked".into()),
        None => {}
        Some(Err(e)) => out
            .problems
            .push(format!("the audit head does not decode: {e}")),
        Some(Ok(h)) => {
            if h.seq > last {
                out.problems.push(if h.seq == last + 1 {
                    format!("entry {} (the newest) is missing (removed)", h.seq)
                } else {
                    format!(
                        "entries {} to {} (the newest) are missing (removed)",
                        last + 1,
                        h.seq
                    )
                });
            } else if h.seq < last {
                out.problems.push(format!(
                    "entries after {} were added outside the appliance (the head records {} as the newest)",
                    h.seq, h.seq
                ));
            } else if h.hash != prev_hash {
                out.problems.push(format!(
                    "entry {last} (the newest) was changed after it was written"
                ));
            }
            out.head = Some(h);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    type Stored = Vec<(Vec<u8>, Vec<u8>)>;

    /// A chain of `n` entries as stored, and its head.
    fn chain(n: u64) -> (Stored, Vec<u8>) {
        let mut head: Option<Vec<u8>> = None;
        let mut entries = Vec::new();
        for i in 0..n {
            let e = Event::done("alice@laptop", "snapshot.delete", format!("snap-{i}"));
            let ops = append_ops(head.as_deref(), &e, i64::try_from(i).unwrap()).unwrap();
            entries.push((ops[0].0.clone(), ops[0].1.clone().unwrap()));
            head = ops[1].1.clone();
        }
        (entries, head.unwrap())
    }

    #[test]
    fn an_intact_chain_verifies() {
        let (e, h) = chain(5);
        let v = verify(&e, Some(&h));
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        assert_eq!(v.entries, 5);
        assert_eq!(v.head.unwrap().seq, 5);
        assert!(verify(&[], None).problems.is_empty());
    }

    #[test]
    fn an_edited_byte_is_named() {
        for victim in 0..5usize {
            let (mut e, h) = chain(5);
            let v = &mut e[victim].1;
            let at = v.windows(5).position(|w| w == b"alice").unwrap();
            v[at] = b'A';
            let r = verify(&e, Some(&h));
            assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
            assert!(
                r.problems[0].contains(&format!("entry {} ", victim + 1)),
                "{:?}",
                r.problems
            );
            assert!(r.problems[0].contains("changed"), "{:?}", r.problems);
        }
    }

    #[test]
    fn a_removed_entry_is_named() {
        for victim in 0..5usize {
            let (mut e, h) = chain(5);
            e.remove(victim);
            let r = verify(&e, Some(&h));
            assert!(!r.problems.is_empty());
            assert!(
                r.problems[0].contains(&format!("entry {} ", victim + 1))
                    && r.problems[0].contains("missing"),
                "{victim}: {:?}",
                r.problems
            );
        }
    }

    #[test]
    fn an_entry_under_another_spelling_of_its_number_is_named() {
        let (mut stored, head) = chain(12);
        // `…0A` sorts between `…09` and `…0a`: a forged entry 10 there must not pass.
        let forged = stored[9].1.clone();
        stored.insert(9, (b"audit/000000000000000A".to_vec(), forged));
        let r = verify(&stored, Some(&head));
        assert!(
            r.problems.iter().any(|p| p.contains("000000000000000A")),
            "{:?}",
            r.problems
        );
    }

    #[test]
    fn swapped_entries_are_named() {
        let (mut stored, head) = chain(5);
        let (second, fourth) = (stored[1].1.clone(), stored[3].1.clone());
        stored[1].1 = fourth;
        stored[3].1 = second;
        let r = verify(&stored, Some(&head));
        assert!(
            r.problems.iter().any(|p| p.contains("entry 2 was moved")),
            "{:?}",
            r.problems
        );
        assert!(
            r.problems.iter().any(|p| p.contains("entry 4 was moved")),
            "{:?}",
            r.problems
        );
    }
}
