//! The conformance suite: the end-to-end behaviours every store backend must show, each test
//! run on a local directory and on SeaweedFS (a real distributed S3 store on loopback), as
//! `conformance <file>::local::<test>` and `<file>::seaweedfs::<test>`. See
//! `ckpt_tests::backend`.

mod corruption;
mod crash;
mod multi_node;
mod node_local;
mod race;
mod rebuild;
mod retention;
mod save_restore;
