//! The need stage: asks the appliance (`FindMissing`) what it needs for each chunk of a batch and
//! keeps only those it lacks or wants proved; chunks it holds and this session may reference go
//! no further. Chunks repeated within one backup never get this far: the upload batcher
//! ([`super::upload::Uploads`]) passes each id once.

use coffer_proto::ChunkId;

use super::chunk::Chunk;
use crate::net::{Codec, Need, Session};
use crate::ClientError;

/// The chunks of `batch` the appliance needs, each with what it needs: the bytes
/// ([`Need::Missing`]) or a possession proof ([`Need::Prove`]).
///
/// # Errors
/// RPC failures.
pub async fn needed(
    session: &Session,
    batch: Vec<(Chunk, Codec)>,
) -> Result<Vec<((Chunk, Codec), Need)>, ClientError> {
    let ids: Vec<ChunkId> = batch.iter().map(|c| c.0.id).collect();
    let needs = session.need(&ids).await?;
    Ok(batch
        .into_iter()
        .zip(needs)
        .filter(|(_, n)| *n != Need::Present)
        .collect())
}
