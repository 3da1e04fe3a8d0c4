//! Benches live in `benches/*.rs`; this empty library only anchors the crate.
