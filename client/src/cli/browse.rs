//! `coffer ls SNAPSHOT[:/path]`, and resolving `SNAPSHOT[:/path]` (a full id or a unique prefix,
//! then a path inside it) for every command that takes one.

use std::path::Path;

use anyhow::{bail, Context};
use coffer_client::{fetch_tree, Session};
use coffer_proto::v1::{Node, NodeKind, Snapshot};
use coffer_proto::{ChunkId, SnapshotId};

use super::connected;

/// Resolves a full id or a unique prefix of at least 8 hex digits.
pub async fn resolve(s: &Session, text: &str) -> anyhow::Result<Snapshot> {
    if let Ok(id) = SnapshotId::from_hex(text) {
        return Ok(s.snapshot(&id).await?);
    }
    if text.len() < 8 {
        bail!("snapshot {text:?}: give the full id or at least 8 hex digits");
    }
    let all = s.list("", true).await?;
    let hits: Vec<_> = all
        .into_iter()
        .filter(|x| hex::encode(&x.id).starts_with(&text.to_ascii_lowercase()))
        .collect();
    match hits.len() {
        1 => Ok(hits.into_iter().next().expect("one")),
        0 => bail!("no snapshot matches {text:?}"),
        n => bail!("{n} snapshots match {text:?}; give more digits"),
    }
}

/// Resolves `SNAPSHOT[:/path]` to the tree or node it names.
pub async fn locate(s: &Session, spec: &str) -> anyhow::Result<(ChunkId, Option<Node>)> {
    let (snap, sub) = spec.split_once(':').unwrap_or((spec, ""));
    let snap = resolve(s, snap).await?;
    // The appliance serves only chunks of snapshots this session opened.
    s.open(&SnapshotId::from_slice(&snap.id)?).await?;
    let mut tree = ChunkId::from_slice(&snap.root)?;
    let mut node = None;
    for comp in sub.split('/').filter(|c| !c.is_empty()) {
        let t = fetch_tree(s, &tree).await?;
        let n = t
            .nodes
            .into_iter()
            .find(|n| &n.name[..] == comp.as_bytes())
            .with_context(|| format!("{comp}: not in the snapshot"))?;
        if NodeKind::try_from(n.kind) == Ok(NodeKind::Dir) {
            tree = ChunkId::from_slice(&n.subtree)?;
            node = None;
        } else {
            node = Some(n);
            break;
        }
    }
    Ok((tree, node))
}

fn kind_char(k: i32) -> char {
    match NodeKind::try_from(k) {
        Ok(NodeKind::Dir) => 'd',
        Ok(NodeKind::Symlink) => 'l',
        _ => '-',
    }
}

/// `rwxr-xr-x` for the permission bits `mode` (setuid, setgid and sticky as `s`/`S`, `t`/`T`).
fn mode_string(mode: u32) -> String {
    let mut s: Vec<char> = "rwxrwxrwx"
        .chars()
        .enumerate()
        .map(|(i, c)| if mode & (0o400 >> i) != 0 { c } else { '-' })
        .collect();
    for (bit, at, lower, upper) in [
        (0o4000, 2, 's', 'S'),
        (0o2000, 5, 's', 'S'),
        (0o1000, 8, 't', 'T'),
    ] {
        if mode & bit != 0 {
            s[at] = if s[at] == '-' { upper } else { lower };
        }
    }
    s.into_iter().collect()
}

/// `coffer ls`: one line per entry of the directory `target` names, or the one file it names.
pub async fn ls(cfg_path: &Path, target: &str, long: bool) -> anyhow::Result<()> {
    let nodes = connected(cfg_path, async |s| {
        let (tree, node) = locate(s, target).await?;
        Ok(match node {
            Some(n) => vec![n],
            None => fetch_tree(s, &tree).await?.nodes,
        })
    })
    .await?;
    for n in nodes {
        let name = String::from_utf8_lossy(&n.name);
        if !long {
            println!("{name}");
            continue;
        }
        let target = if n.symlink_target.is_empty() {
            String::new()
        } else {
            format!(" -> {}", String::from_utf8_lossy(&n.symlink_target))
        };
        println!(
            "{}{} {:>11} {:>12} {} {name}{target}",
            kind_char(n.kind),
            mode_string(n.mode),
            format!("{}:{}", n.uid, n.gid),
            n.size,
            super::local_time(n.mtime_ns.div_euclid(1000)),
        );
    }
    Ok(())
}
