//! How a failed run ends: one line on stderr and an exit code from one table
//! ([`Failure`]), the same in every binary (README, "Exit codes and output").

use crate::ingest::source::SourceError;

/// Prints `error: ` and the error's whole chain as one line on stderr.
pub fn print_error(error: &anyhow::Error) {
    eprintln!("error: {}", one_line(error));
}

/// Bad arguments or configuration, said in one line: exit code 2 in every binary.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The question was answered, and the answer is: nothing (exit code 6).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NothingFound(pub String);

/// How a failed run ends: the exit code, the same in every binary, so that a scheduler or a
/// script can tell what to do next without reading the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The database, the network or a service failed: running again may succeed.
    Fault = 1,
    /// Bad arguments or configuration: fix the command line or the environment.
    Usage = 2,
    /// The vault refused this login or this request (grants, doors): ask for the right role,
    /// or for something the doors allow.
    Refused = 3,
    /// Evidence of tampering (a value, a key or the audit does not verify): keep the
    /// database as it is and follow docs/runbook.md.
    Integrity = 4,
    /// KMS refused (access denied, a key disabled, pending deletion or unknown).
    KmsRefused = 5,
    /// Nothing matched the question (still audited where the question is a reveal).
    NothingFound = 6,
}

impl Failure {
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The failure an error stands for: its first cause, outermost first, that says more
    /// than a fault.
    pub fn of(error: &anyhow::Error) -> Failure {
        error.chain().find_map(classify).unwrap_or(Failure::Fault)
    }
}

/// What one cause says, if it says more than "a fault"; wrappers answer `None` and let the
/// chain go on to their source.
fn classify(cause: &(dyn std::error::Error + 'static)) -> Option<Failure> {
    use crate::audit::witness::WitnessError;
    use crate::audit::{Broken, VerifyError};
    use crate::lifecycle::LifecycleError;
    use crate::unmask::UnmaskError;
    use crate::vault::handed_out::IntegrityError;
    use crate::vault::keyring::KeyringError;
    use crate::vault::kms::KmsError;

    if cause.is::<UsageError>() {
        return Some(Failure::Usage);
    }
    if cause.is::<NothingFound>() {
        return Some(Failure::NothingFound);
    }
    if cause.is::<IntegrityError>() || cause.is::<Broken>() {
        return Some(Failure::Integrity);
    }
    if let Some(e) = cause.downcast_ref::<UnmaskError>() {
        return match e {
            UnmaskError::NotAuthorized(_) | UnmaskError::Refused(_) => Some(Failure::Refused),
            UnmaskError::Integrity { .. } => Some(Failure::Integrity),
            UnmaskError::KmsRefused { error, .. } => classify(error),
            UnmaskError::Keys(keys) => classify(keys),
            UnmaskError::Database(db) => classify(db),
        };
    }
    if let Some(e) = cause.downcast_ref::<LifecycleError>() {
        return match e {
            LifecycleError::Integrity { .. } | LifecycleError::ErasureRecord { .. } => {
                Some(Failure::Integrity)
            }
            LifecycleError::NoSuchUser => Some(Failure::NothingFound),
            LifecycleError::WindowTaken { .. }
            | LifecycleError::WindowKeyTaken { .. }
            | LifecycleError::WindowKeyRefused { .. } => Some(Failure::Refused),
            _ => None,
        };
    }
    if let Some(e) = cause.downcast_ref::<KeyringError>() {
        return match e {
            KeyringError::NoTokenKey => Some(Failure::Usage),
            _ => None,
        };
    }
    if let Some(KmsError::Refused { code, .. }) = cause.downcast_ref::<KmsError>() {
        // A wrapped key that does not decrypt under its own context was altered or moved:
        // tampering, not a refusal of the caller.
        return Some(if code == "InvalidCiphertextException" {
            Failure::Integrity
        } else {
            Failure::KmsRefused
        });
    }
    if let Some(e) = cause.downcast_ref::<VerifyError>() {
        return match e {
            VerifyError::Broken(_) => Some(Failure::Integrity),
            // Transparent: the chain goes on past the witness error's own text.
            VerifyError::Witness(witness) => classify(witness),
            _ => None,
        };
    }
    if let Some(e) = cause.downcast_ref::<WitnessError>() {
        return match e {
            WitnessError::Conflict { .. } => Some(Failure::Integrity),
            WitnessError::NotLocked { .. } => Some(Failure::Usage),
            WitnessError::Refused { status: 403, .. } => Some(Failure::Refused),
            WitnessError::Refused { status: 404, .. } => Some(Failure::Usage),
            _ => None,
        };
    }
    if let Some(crate::db::DbError::InvalidUrl { .. }) = cause.downcast_ref() {
        return Some(Failure::Usage);
    }
    if let Some(e) = sql_error(cause) {
        return sql_failure(e);
    }
    if let Some(e) = cause.downcast_ref::<SourceError>() {
        return match e {
            e if e.transient => None,
            e if e.message.contains("AccessDenied") => Some(Failure::Refused),
            _ => Some(Failure::Usage),
        };
    }
    None
}

/// PostgreSQL's refusals: no privilege (42501), a login refused (28000, 28P01). A door's own
/// `RAISE` (P0001) says why in its message and may be a fault (the audit unavailable).
fn sql_failure(error: &sqlx::Error) -> Option<Failure> {
    let sqlx::Error::Database(e) = error else {
        return None;
    };
    match e.code().as_deref() {
        Some("42501" | "28000" | "28P01") => Some(Failure::Refused),
        _ => None,
    }
}

/// PostgreSQL refused a privilege somewhere in the chain (42501).
pub(super) fn lacks_privilege(error: &anyhow::Error) -> bool {
    error
        .chain()
        .any(|cause| sql_error(cause).is_some_and(crate::db::is_permission_denied))
}

/// The database error a cause is or wraps transparently (`DbError::Query` lets the chain
/// skip past its own text).
fn sql_error<'a>(cause: &'a (dyn std::error::Error + 'static)) -> Option<&'a sqlx::Error> {
    match cause.downcast_ref::<crate::db::DbError>() {
        Some(crate::db::DbError::Query(query)) => Some(query),
        _ => cause.downcast_ref::<sqlx::Error>(),
    }
}

/// `outer: cause: root cause`, skipping causes whose text the outer message already includes.
pub fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace('\n', " ")
}
