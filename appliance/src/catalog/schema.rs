//! The catalog's schema version and its migrations.
//!
//! Version 1 is the layout of `docs/format.md` (users, rules, snapshots, settings). A catalog
//! without a version key was written before versions were recorded and holds version-1 records.
//! At every open, [`migrate`] runs each step from the stored version up to [`CURRENT`] and then
//! records it; a catalog newer than this build is refused, never rewritten.

use super::{key, Catalog, CatalogError};

/// The schema this build writes.
pub const CURRENT: u32 = 1;

/// One migration step: rewrites records of version `from` into version `from + 1`. Each step
/// must be idempotent (a crash before the version is recorded runs it again).
type Step = fn(&Catalog) -> Result<(), CatalogError>;

/// `STEPS[i]` migrates version `i + 1` to `i + 2`. Empty while version 1 is the only one.
const STEPS: &[Step] = &[];

/// The stored schema version (1 when none is stored).
///
/// # Errors
/// Engine errors; a version key that does not decode.
pub fn version(c: &Catalog) -> Result<u32, CatalogError> {
    match c.get_raw(key::SCHEMA)? {
        None => Ok(1),
        Some(v) => <[u8; 4]>::try_from(v.as_slice())
            .map(u32::from_le_bytes)
            .map_err(|_| CatalogError::Decode {
                key: "meta/schema".into(),
                why: format!("{} bytes, expected 4", v.len()),
            }),
    }
}

/// Brings the catalog to [`CURRENT`].
///
/// # Errors
/// [`CatalogError::Newer`] for a catalog written by a newer build; engine errors.
pub fn migrate(c: &Catalog) -> Result<(), CatalogError> {
    migrate_with(c, STEPS, CURRENT)
}

fn migrate_with(c: &Catalog, steps: &[Step], current: u32) -> Result<(), CatalogError> {
    let found = version(c)?;
    if found == 0 {
        return Err(CatalogError::Decode {
            key: "meta/schema".into(),
            why: "version 0 does not exist".into(),
        });
    }
    if found > current {
        return Err(CatalogError::Newer {
            found,
            supported: current,
        });
    }
    for v in found..current {
        let step = steps
            .get(v as usize - 1)
            .expect("one migration step per version below CURRENT");
        step(c)?;
        tracing::info!(from = v, to = v + 1, "catalog migrated");
    }
    if c.get_raw(key::SCHEMA)?.is_none() || found != current {
        c.put_raw(key::SCHEMA, &current.to_le_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &std::path::Path) -> Catalog {
        Catalog::open(&dir.join("catalog"), true).unwrap()
    }

    #[test]
    fn records_the_version_and_refuses_a_newer_catalog() {
        let dir = tempfile::tempdir().unwrap();
        let c = open(dir.path());
        assert_eq!(version(&c).unwrap(), CURRENT);
        c.put_raw(key::SCHEMA, &(CURRENT + 1).to_le_bytes())
            .unwrap();
        drop(c);
        let err = Catalog::open(&dir.path().join("catalog"), false).unwrap_err();
        assert!(matches!(err, CatalogError::Newer { found, .. } if found == CURRENT + 1));
    }

    #[test]
    fn runs_each_step_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let c = open(dir.path());
        c.put_raw(key::SCHEMA, &1u32.to_le_bytes()).unwrap();
        let steps: &[Step] = &[
            |c| c.put_raw(b"setting/step", b"2"),
            |c| {
                let seen = c.get_raw(b"setting/step")?;
                assert_eq!(seen.as_deref(), Some(&b"2"[..]), "steps run in order");
                c.put_raw(b"setting/step", b"3")
            },
        ];
        migrate_with(&c, steps, 3).unwrap();
        assert_eq!(version(&c).unwrap(), 3);
        assert_eq!(c.setting("step").unwrap().as_deref(), Some("3"));
        // At version 3 nothing runs again.
        c.put_raw(b"setting/step", b"x").unwrap();
        migrate_with(&c, steps, 3).unwrap();
        assert_eq!(c.setting("step").unwrap().as_deref(), Some("x"));
    }
}
