//! `coffer restore SNAPSHOT[:/path] TARGET`.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::bail;
use coffer_client::restore_with as restore_tree;

use super::browse::locate;
use super::connected;

/// Restores the directory `source` names into `target`; owners too when running as root.
pub async fn restore(
    cfg_path: &Path,
    source: &str,
    target: &Path,
    json: bool,
    overwrite: coffer_client::Overwrite,
) -> anyhow::Result<()> {
    let sum = connected(cfg_path, async |s| {
        let (tree, node) = locate(s, source).await?;
        if node.is_some() {
            bail!("{source} names a file; restore a directory (its parent) instead");
        }
        let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        Ok(restore_tree(s, tree, target, root, overwrite).await?)
    })
    .await?;
    if json {
        println!("{}", serde_json::to_string(&sum)?);
    } else {
        println!(
            "restored {} files, {} directories, {} symlinks, {} into {}",
            sum.files,
            sum.dirs,
            sum.symlinks,
            indicatif::HumanBytes(sum.bytes),
            target.display()
        );
        if sum.replaced > 0 || sum.kept > 0 {
            println!(
                "{} existing files or symlinks replaced, {} left as they were (--overwrite)",
                sum.replaced, sum.kept
            );
        }
    }
    Ok(())
}
