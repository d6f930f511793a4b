//! What roots and version-1 manifests share: the seal (blake3 of the value serialised with its
//! `hash` field empty, so a reader can tell a damaged commit object from a valid one) and the
//! structural checks of their common fields.

use serde::Serialize;

use crate::error::CoreError;
use crate::validate::{validate_job, validate_world_size, Limits};

pub(crate) trait Sealed: Serialize + Clone {
    fn hash_field(&mut self) -> &mut String;
}

/// The seal of `value`, whatever its `hash` field holds now.
pub(crate) fn seal<T: Sealed>(value: &T) -> String {
    let mut unsealed = value.clone();
    unsealed.hash_field().clear();
    // Serialising plain structs, strings and serde_json values cannot fail.
    blake3::hash(&serde_json::to_vec(&unsealed).unwrap_or_default()).to_hex().to_string()
}

/// Checks that `value` carries its own seal.
pub(crate) fn check_seal<T: Sealed>(value: &T) -> Result<(), CoreError> {
    let expected = seal(value);
    let stated = value.clone().hash_field().clone();
    if stated != expected {
        return Err(CoreError::InvalidManifest(format!("hash is {stated} but content hashes to {expected}")));
    }
    Ok(())
}

/// The checks every commit object's common fields pass: a valid job, a world size within the
/// limits with one entry (`what`) per rank, and a previous committed step before this one.
pub(crate) fn check_common(
    job: &str,
    world_size: u32,
    entries: usize,
    what: &str,
    previous_committed_step: Option<u64>,
    step: u64,
    limits: &Limits,
) -> Result<(), CoreError> {
    validate_job(job)?;
    validate_world_size(world_size, limits)?;
    if entries != world_size as usize {
        return Err(CoreError::InvalidManifest(format!("{entries} {what} for world size {world_size}")));
    }
    if previous_committed_step.is_some_and(|p| p >= step) {
        return Err(CoreError::InvalidManifest("previous committed step is not before this step".into()));
    }
    Ok(())
}
