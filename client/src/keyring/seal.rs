//! Sealing chunks and snapshot headers under a keyring (`docs/format.md`, "Sealed chunk" and
//! "Sealed header").
//!
//! * A chunk is encrypted convergently: its seed `ck` is keyed BLAKE3 of the body (compressed
//!   plaintext) under `K_conv`, and the envelope is sealed to the keyring's data public key
//!   with an ephemeral X25519 key derived from `ck` (HKDF-SHA256, AES-256-GCM). Identical
//!   plaintext gives identical bytes within the keyring, so the appliance deduplicates them
//!   without reading them, and only holders of the data private key open them. Each derived
//!   key seals exactly one body, so a fixed nonce is safe. The envelope carries the ephemeral
//!   public key and nothing else per chunk (no wrapped key): 59 bytes beyond the compressed
//!   data for a chunk without references (`docs/format.md`).
//! * A snapshot header is signed by its writer (Ed25519, with the writer's certificate) and
//!   sealed to the log public key with a random ephemeral key.
//!
//! Readers check everything: the AEAD tag, the keyed id of the plaintext, the certificate
//! chain and the writer's signature. Nothing unverified is returned.

use bytes::Bytes;
use coffer_proto::sealed::{decode_refs, encode_refs, read_varint, Refs};
use coffer_proto::{v1, ChunkId};
use ed25519_dalek::{Signer, Verifier};
use prost::Message;
use ring::aead;

use super::{derive, keyring, x25519_public, Key, Member, Role};
use crate::net::{Codec, Frame};
use crate::ClientError;

const CHUNK_INFO: &[u8] = b"coffer 2026 sealed chunk v2";
const HEADER_INFO: &[u8] = b"coffer 2026 sealed header v1";
const CTX_EPH: &str = "coffer 2026 sealed chunk ephemeral key v2";
/// Magic of a sealed snapshot header.
pub const HEADER_MAGIC: &[u8; 4] = b"CSH1";
const TAG: usize = 16;
/// Body compression: zstd with the envelope's references as a raw-content dictionary, so that
/// the ids a tree object or list chunk holds (already in clear before it) cost a few bytes each
/// instead of 32 again. Outside the protocol's `Compression` values on purpose: only readers of
/// the body ever see it.
const ZSTD_REFS: u8 = 16;
/// First bytes of a zstd dictionary: a reference list starting so would not be raw content.
const ZSTD_DICT_MAGIC: [u8; 4] = 0xEC30_A437u32.to_le_bytes();

/// How many ids the envelope head `head` (as `encode_refs` wrote it) declares: its three counts,
/// read without decoding the ids.
fn ref_count(head: &[u8]) -> usize {
    let mut at = coffer_proto::sealed::ENVELOPE_MAGIC.len();
    let mut n = 0;
    for _ in 0..3 {
        let Ok((c, used)) = read_varint(&head[at.min(head.len())..]) else {
            return 0;
        };
        n += c as usize;
        at += used;
    }
    n
}

/// `plain` compressed with zstd against `dict` (the envelope's ids), when that is possible and
/// smaller.
fn compress_with_refs(plain: &[u8], dict: &[u8], codec: Codec) -> Option<Vec<u8>> {
    let level = match codec {
        Codec::None => return None,
        Codec::Zstd(level) => level,
        Codec::Lz4 => 1,
    };
    if dict.is_empty() || dict.starts_with(&ZSTD_DICT_MAGIC) {
        return None;
    }
    let packed = zstd::bulk::Compressor::with_dictionary(level, dict)
        .and_then(|mut z| z.compress(plain))
        .ok()?;
    (packed.len() < plain.len()).then_some(packed)
}

/// AES-256-GCM with a zero nonce: only for keys that seal one message (see the module doc).
pub(crate) fn aead_seal(key: &Key, aad: &[u8], plain: &[u8]) -> Vec<u8> {
    let k = aead::LessSafeKey::new(
        aead::UnboundKey::new(&aead::AES_256_GCM, key).expect("32-byte key"),
    );
    let mut out = plain.to_vec();
    k.seal_in_place_append_tag(
        aead::Nonce::assume_unique_for_key([0; 12]),
        aead::Aad::from(aad),
        &mut out,
    )
    .expect("AES-GCM seals any chunk");
    out
}

/// Opens what [`aead_seal`] sealed; `None` when the tag does not verify.
pub(crate) fn aead_open(key: &Key, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    let k = aead::LessSafeKey::new(
        aead::UnboundKey::new(&aead::AES_256_GCM, key).expect("32-byte key"),
    );
    let mut buf = sealed.to_vec();
    let n = k
        .open_in_place(
            aead::Nonce::assume_unique_for_key([0; 12]),
            aead::Aad::from(aad),
            &mut buf,
        )
        .ok()?
        .len();
    buf.truncate(n);
    Some(buf)
}

/// The AEAD key of an X25519 agreement between `eph_public` and `recipient`.
fn agreed(shared: &[u8; 32], eph_public: &Key, recipient: &Key, info: &[u8]) -> Key {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(eph_public);
    salt[32..].copy_from_slice(recipient);
    let mut k = [0u8; 32];
    hkdf::Hkdf::<sha2::Sha256>::new(Some(&salt[..]), shared)
        .expand(info, &mut k)
        .expect("32 bytes is a valid HKDF-SHA256 length");
    k
}

fn dh(secret: &Key, public: &Key) -> [u8; 32] {
    x25519_dalek::StaticSecret::from(*secret)
        .diffie_hellman(&x25519_dalek::PublicKey::from(*public))
        .to_bytes()
}

impl Member {
    /// The envelope of `plain` (a tree, list chunk or file data, declaring `refs`), compressed
    /// with `codec` when that saves space, then sealed. Deterministic: the same plaintext gives
    /// the same envelope within the keyring and generation.
    ///
    /// # Errors
    /// A member without the keys to write.
    pub fn seal_chunk(
        &self,
        refs: &Refs,
        plain: Bytes,
        codec: Codec,
    ) -> Result<Vec<u8>, ClientError> {
        let conv = self
            .conv_key
            .ok_or_else(|| self.lacks("back up (it has no chunk key)"))?;
        let mut out = encode_refs(refs);
        let ids = &out[out.len() - ref_count(&out) * 32..];
        let mut body = Vec::with_capacity(6 + plain.len());
        if let Some(packed) = compress_with_refs(&plain, ids, codec) {
            body.push(ZSTD_REFS);
            prost::encoding::encode_varint(plain.len() as u64, &mut body);
            body.extend_from_slice(&packed);
        } else {
            let frame = Frame::new(ChunkId::default(), plain, codec);
            body.push(u8::try_from(i32::from(frame.compression)).unwrap_or(0));
            prost::encoding::encode_varint(u64::from(frame.raw_len), &mut body);
            body.extend_from_slice(&frame.data);
        }
        // The seed of exactly this body (compressed form included): two bodies never share an
        // ephemeral key, hence never a body key, so the fixed nonce never seals two messages
        // under one key.
        let ck = blake3::keyed_hash(&conv, &body).into();
        let eph = derive(CTX_EPH, &ck, None);
        let eph_public = x25519_public(&eph);
        let key = agreed(
            &dh(&eph, &self.data_public),
            &eph_public,
            &self.data_public,
            CHUNK_INFO,
        );
        prost::encoding::encode_varint(u64::from(self.generation), &mut out);
        out.extend_from_slice(&eph_public);
        let sealed = aead_seal(&key, &out, &body);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens the envelope of chunk `want`: its plaintext, once the AEAD tags verify and the
    /// plaintext hashes to `want` under the keyring's id key.
    ///
    /// # Errors
    /// [`ClientError::Corrupt`] for an envelope that does not open or is another chunk's (a
    /// poisoned record); a member without the keys to read.
    pub fn open_chunk(
        &self,
        want: &ChunkId,
        envelope: &[u8],
        limit: usize,
    ) -> Result<Bytes, ClientError> {
        let corrupt = || ClientError::Corrupt(want.to_hex());
        let (refs, refs_end) = decode_refs(envelope).map_err(|_| corrupt())?;
        let ids = &envelope[refs_end - refs.all().count() * 32..refs_end];
        debug_assert_eq!(refs.all().count(), ref_count(&envelope[..refs_end]));
        let (g, used) = read_varint(&envelope[refs_end..]).map_err(|_| corrupt())?;
        let at = refs_end + used;
        if envelope.len() < at + 32 + TAG {
            return Err(corrupt());
        }
        // No keyring rotates this often: such a generation is damage or garbage, not keys this
        // member file lacks.
        if g == 0 || g > self.generation.saturating_add(64) {
            return Err(corrupt());
        }
        let secret = self.data_secret.get(&g).ok_or_else(|| {
            if self.data_secret.is_empty() {
                self.lacks("read chunks (it holds no data key)")
            } else {
                keyring(format!(
                    "chunk {want} is sealed under key generation {g}, which the member file of \
                     {} does not hold: after a rotation, issue the file again from the master; \
                     otherwise the record is damaged or poisoned (`coffer-appliance verify`)",
                    self.member
                ))
            }
        })?;
        let eph_public: Key = envelope[at..at + 32].try_into().expect("32 bytes");
        let key = agreed(
            &dh(secret, &eph_public),
            &eph_public,
            &x25519_public(secret),
            CHUNK_INFO,
        );
        let body_at = at + 32;
        let body =
            aead_open(&key, &envelope[..body_at], &envelope[body_at..]).ok_or_else(corrupt)?;
        let Some((&compression, rest)) = body.split_first() else {
            return Err(corrupt());
        };
        let (raw_len, used) = read_varint(rest).map_err(|_| corrupt())?;
        let (raw_len, data) = (raw_len as usize, &rest[used..]);
        if raw_len > limit {
            return Err(corrupt());
        }
        let plain: Bytes = match v1::Compression::try_from(i32::from(compression)) {
            _ if compression == ZSTD_REFS && !ids.starts_with(&ZSTD_DICT_MAGIC) => {
                let out = zstd::bulk::Decompressor::with_dictionary(ids)
                    .and_then(|mut z| z.decompress(data, raw_len))
                    .map_err(|_| corrupt())?;
                if out.len() != raw_len {
                    return Err(corrupt());
                }
                out.into()
            }
            Ok(v1::Compression::None) if data.len() == raw_len => Bytes::copy_from_slice(data),
            Ok(c @ (v1::Compression::Zstd | v1::Compression::Lz4)) => {
                coffer_proto::codec::decode(c, data, raw_len)
                    .map_err(|_| corrupt())?
                    .into()
            }
            _ => return Err(corrupt()),
        };
        // The tag proves the body was sealed to this keyring's data key; the keyed id proves it
        // is the chunk asked for (only members hold `K_id`). Whether the writer derived its
        // ephemeral key canonically is not checked: another valid envelope of the same chunk
        // is only another digest on the appliance (`docs/security.md`).
        if coffer_proto::chunk_id(&self.id_key()?, &plain) != *want {
            return Err(corrupt());
        }
        Ok(plain)
    }

    /// The opaque tag that stands for `path` on the appliance: the same for every backup of
    /// the path within the keyring (retention groups by it), telling nothing else.
    ///
    /// # Errors
    /// A member without the path key (log-only).
    pub fn path_tag(&self, path: &str) -> Result<String, ClientError> {
        let k = self
            .path_key
            .ok_or_else(|| self.lacks("back up (it has no path key)"))?;
        Ok(format!(
            "/.sealed/{}",
            hex::encode(&blake3::keyed_hash(&k, path.as_bytes()).as_bytes()[..16])
        ))
    }

    /// Signs `body` and seals it to the log key: what goes into `Snapshot.sealed`.
    ///
    /// # Errors
    /// A member without a signing key.
    pub fn seal_header(&self, body: &v1::HeaderBody) -> Result<Vec<u8>, ClientError> {
        let signing = self.signing.ok_or_else(|| self.lacks("sign snapshots"))?;
        let body = body.encode_to_vec();
        let signed = v1::SignedHeader {
            signature: ed25519_dalek::SigningKey::from_bytes(&signing)
                .sign(&body)
                .to_bytes()
                .to_vec()
                .into(),
            body: body.into(),
            writer: Some(self.cert.clone()),
        }
        .encode_to_vec();
        let eph: Key = rand::random();
        let eph_public = x25519_public(&eph);
        let key = agreed(
            &dh(&eph, &self.log_public),
            &eph_public,
            &self.log_public,
            HEADER_INFO,
        );
        let mut out = HEADER_MAGIC.to_vec();
        out.extend_from_slice(&self.generation.to_le_bytes());
        out.extend_from_slice(&eph_public);
        let sealed = aead_seal(&key, &out, &signed);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens and verifies the sealed header of `snap`: sealed to this keyring's log key,
    /// written by a member the master certified (never a log-only one), signed by it, and
    /// agreeing with what the appliance shows (account and root).
    ///
    /// # Errors
    /// [`ClientError::Keyring`] saying which check failed; a member that cannot list.
    pub fn open_header(
        &self,
        snap: &v1::Snapshot,
    ) -> Result<(v1::HeaderBody, String), ClientError> {
        let id = hex::encode(&snap.id);
        let bad = |why: &str| keyring(format!("snapshot {id}: {why}; it is not restored"));
        let s = &snap.sealed[..];
        if s.len() < 40 + TAG || &s[..4] != HEADER_MAGIC {
            return Err(bad(
                "it has no sealed header (not written by a keyring member)",
            ));
        }
        let g = u32::from_le_bytes(s[4..8].try_into().expect("4 bytes"));
        let secret = self.log_secret.get(&g).ok_or_else(|| {
            if self.log_secret.is_empty() {
                self.lacks("list snapshots (it holds no log key)")
            } else {
                bad(&format!("its header is sealed under key generation {g}, which this member file does not hold"))
            }
        })?;
        // Keys retired by a rotation (a removed member's) seal nothing newer than the rotation;
        // five minutes allow for a backup that was running across it.
        // The appliance's commit time, not the writer's word (a removed member would backdate).
        let committed = if snap.committed_us > 0 {
            snap.committed_us
        } else {
            snap.time_us
        };
        if let Some(next) = self.rotations.get(&(g + 1)) {
            if committed > next + 300_000_000 {
                return Err(bad(&format!(
                    "its header is sealed under key generation {g}, retired at {} (a removed \
                     member, or a machine whose keys were not issued again)",
                    coffer_proto::when::format_us(*next)
                )));
            }
        }
        let eph_public: Key = s[8..40].try_into().expect("32 bytes");
        let key = agreed(
            &dh(secret, &eph_public),
            &eph_public,
            &x25519_public(secret),
            HEADER_INFO,
        );
        let signed = aead_open(&key, &s[..40], &s[40..]).ok_or_else(|| {
            bad("its sealed header does not open under this keyring (another keyring, or altered)")
        })?;
        let signed = v1::SignedHeader::decode(&signed[..])
            .map_err(|_| bad("its sealed header does not decode"))?;
        let cert = signed
            .writer
            .as_ref()
            .ok_or_else(|| bad("its header names no writer"))?;
        let writer = self.verify_cert(cert).map_err(|e| bad(&e.to_string()))?;
        if writer.role == Role::LogOnly.name() {
            return Err(bad("its writer is a log-only member"));
        }
        if writer.generation != g {
            return Err(bad(&format!(
                "its writer was certified for key generation {}, not the header's {g}",
                writer.generation
            )));
        }
        let vk = <[u8; 32]>::try_from(&writer.signing_public[..])
            .ok()
            .and_then(|k| ed25519_dalek::VerifyingKey::from_bytes(&k).ok())
            .ok_or_else(|| bad("its writer's certificate holds a malformed key"))?;
        let sig = ed25519_dalek::Signature::from_slice(&signed.signature)
            .map_err(|_| bad("its signature is malformed"))?;
        vk.verify(&signed.body, &sig)
            .map_err(|_| bad("its signature does not verify (altered)"))?;
        let body = v1::HeaderBody::decode(&signed.body[..])
            .map_err(|_| bad("its signed header does not decode"))?;
        if body.keyring_id[..] != self.keyring_id[..]
            || body.identity != snap.identity
            || writer.member != snap.identity
            || body.root != snap.root
        {
            return Err(bad(
                "its signed header does not match the snapshot the appliance shows (account or \
                 root changed)",
            ));
        }
        Ok((body, writer.member))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Master, Role};
    use super::*;

    fn members() -> (Member, Member, Member) {
        let m = Master::generate();
        (
            m.issue("a@h", Role::ReadWrite),
            m.issue("w@h", Role::WriteOnly),
            m.issue("l@h", Role::LogOnly),
        )
    }

    #[test]
    fn chunks_seal_deterministically_and_only_readers_open_them() {
        let (rw, wo, _) = members();
        let plain = Bytes::from("coffer sealed ".repeat(500));
        let id = coffer_proto::chunk_id(&wo.id_key().unwrap(), &plain);
        let refs = Refs {
            leaves: vec![ChunkId::from_bytes([9; 32])],
            ..Refs::default()
        };
        let a = wo.seal_chunk(&refs, plain.clone(), Codec::Zstd(3)).unwrap();
        let b = rw.seal_chunk(&refs, plain.clone(), Codec::Zstd(3)).unwrap();
        assert_eq!(a, b, "convergent: the same bytes from every writer");
        assert!(a.len() < plain.len(), "compressed before sealing");
        assert!(!a.windows(14).any(|w| w == b"coffer sealed "));
        assert_eq!(decode_refs(&a).unwrap().0, refs);
        assert_eq!(rw.open_chunk(&id, &a, 1 << 20).unwrap(), plain);
        let e = wo.open_chunk(&id, &a, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("write-only"), "{e}");
        // Any flipped byte past the references, or another id, is refused.
        for at in [decode_refs(&a).unwrap().1 + 2, a.len() - 1, a.len() / 2] {
            let mut bad = a.clone();
            bad[at] ^= 1;
            assert!(matches!(
                rw.open_chunk(&id, &bad, 1 << 20),
                Err(ClientError::Corrupt(_))
            ));
        }
        let other = ChunkId::from_bytes([1; 32]);
        assert!(rw.open_chunk(&other, &a, 1 << 20).is_err());
        // Another keyring cannot open it.
        let (stranger, _, _) = members();
        assert!(stranger.open_chunk(&id, &a, 1 << 20).is_err());
    }

    #[test]
    fn envelopes_cost_59_bytes_and_references_are_not_paid_twice() {
        let (rw, _, _) = members();
        let id_key = rw.id_key().unwrap();
        // File data: head 7, generation 1, ephemeral key 32, compression 1, raw length 2, tag 16.
        let noise: Vec<u8> = (0..1000u32)
            .flat_map(|i| blake3::hash(&i.to_le_bytes()).as_bytes()[..1].to_vec())
            .collect();
        let env = rw
            .seal_chunk(&Refs::default(), noise.clone().into(), Codec::None)
            .unwrap();
        assert_eq!(env.len(), noise.len() + 59);
        // A tree-like object naming 50 ids (random bytes, incompressible on their own): the ids
        // it holds are coded against the clear references, not stored a second time.
        let ids: Vec<ChunkId> = (0..50u8)
            .map(|i| ChunkId::from_bytes(*blake3::hash(&[i]).as_bytes()))
            .collect();
        let mut tree = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            tree.extend_from_slice(format!("file-{i}.c").as_bytes());
            tree.extend_from_slice(id.as_bytes());
        }
        let refs = Refs {
            leaves: ids.clone(),
            ..Refs::default()
        };
        let env = rw
            .seal_chunk(&refs, tree.clone().into(), Codec::Zstd(3))
            .unwrap();
        assert!(
            env.len() < 50 * 32 + (tree.len() - 50 * 32) + 59 + 50 * 6,
            "{} bytes for {} of tree and {} of references",
            env.len(),
            tree.len(),
            50 * 32
        );
        let want = coffer_proto::chunk_id(&id_key, &tree);
        assert_eq!(rw.open_chunk(&want, &env, 1 << 20).unwrap(), tree);
        // The references are authenticated: another id in their place fails the tag.
        let (_, end) = decode_refs(&env).unwrap();
        let mut forged = env.clone();
        forged[end - 1] ^= 1;
        assert!(matches!(
            rw.open_chunk(&want, &forged, 1 << 20),
            Err(ClientError::Corrupt(_))
        ));
    }

    #[test]
    fn headers_are_signed_sealed_and_checked_against_the_snapshot() {
        let (rw, wo, lo) = members();
        let body = v1::HeaderBody {
            keyring_id: wo.keyring_id.to_vec().into(),
            identity: "w@h".into(),
            path: "/secret/path".into(),
            root: vec![7; 32].into(),
            ..v1::HeaderBody::default()
        };
        let mut snap = v1::Snapshot {
            id: vec![1; 16].into(),
            identity: "w@h".into(),
            root: vec![7; 32].into(),
            sealed: wo.seal_header(&body).unwrap().into(),
            ..v1::Snapshot::default()
        };
        assert!(!snap.sealed.windows(6).any(|w| w == b"secret"));
        for reader in [&rw, &lo] {
            let (got, writer) = reader.open_header(&snap).unwrap();
            assert_eq!(
                (got.path.as_str(), writer.as_str()),
                ("/secret/path", "w@h")
            );
        }
        assert!(wo
            .open_header(&snap)
            .unwrap_err()
            .to_string()
            .contains("write-only"));
        assert!(
            lo.seal_header(&body).is_err(),
            "log-only members cannot sign"
        );
        // The appliance shows another account or root: refused.
        snap.identity = "a@h".into();
        assert!(rw.open_header(&snap).is_err());
        snap.identity = "w@h".into();
        snap.root = vec![8; 32].into();
        assert!(rw.open_header(&snap).is_err());
        // A member signing for another account is refused.
        let mut lying = body.clone();
        lying.identity = "a@h".into();
        snap.root = vec![7; 32].into();
        snap.identity = "a@h".into();
        snap.sealed = wo.seal_header(&lying).unwrap().into();
        assert!(rw
            .open_header(&snap)
            .unwrap_err()
            .to_string()
            .contains("does not match"));
    }

    #[test]
    fn a_removed_members_keys_seal_nothing_newer_than_its_removal() {
        let mut m = Master::generate();
        let wo = m.add_member("w@h", Role::WriteOnly).unwrap();
        let body = v1::HeaderBody {
            keyring_id: wo.keyring_id.to_vec().into(),
            identity: "w@h".into(),
            root: vec![7; 32].into(),
            ..v1::HeaderBody::default()
        };
        let sealed: Bytes = wo.seal_header(&body).unwrap().into();
        let keep = m.remove_member("w@h").unwrap();
        assert!(keep.is_empty());
        assert!(
            m.add_member("w@h", Role::WriteOnly).is_err(),
            "removed for good"
        );
        let reader = m.add_member("a@h", Role::ReadWrite).unwrap();
        let rotated = m.rotations[&2];
        let snap = |committed_us| v1::Snapshot {
            identity: "w@h".into(),
            root: vec![7; 32].into(),
            sealed: sealed.clone(),
            // The writer's own date cannot bring it back before the rotation.
            time_us: 1,
            committed_us,
            ..v1::Snapshot::default()
        };
        // Written before the removal: still valid.
        reader.open_header(&snap(rotated - 1)).unwrap();
        // Committed well after it under the old keys: refused.
        let e = reader
            .open_header(&snap(rotated + 3_600_000_000))
            .unwrap_err()
            .to_string();
        assert!(e.contains("retired"), "{e}");
        // What the reader writes now is sealed under the new generation.
        let again = reader.seal_header(&v1::HeaderBody {
            identity: "a@h".into(),
            ..body
        });
        assert_eq!(&again.unwrap()[4..8], &2u32.to_le_bytes());
    }

    #[test]
    fn path_tags_are_stable_and_opaque() {
        let (rw, wo, lo) = members();
        let t = wo.path_tag("/home/alice").unwrap();
        assert_eq!(t, rw.path_tag("/home/alice").unwrap());
        assert_ne!(t, wo.path_tag("/home/bob").unwrap());
        assert!(t.starts_with("/.sealed/") && !t.contains("alice"));
        assert!(lo.path_tag("/x").is_err());
    }
}
