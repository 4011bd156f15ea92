//! The places a value is sealed for: the table, field, row and user its associated data names
//! (docs/FORMAT.md §4 and §5). Ingest seals at these places; unmask, verify and rotation open
//! at the same ones, so a value copied anywhere else does not open.

use super::seal::Place;
use super::token::Field;

/// The table whose rows the sealed personal fields belong to (part of the associated data).
pub const LOGINS_TABLE: &str = "user_logins";
/// The table whose rows sealed bodies belong to (part of the associated data).
pub const QUARANTINE_TABLE: &str = "quarantine";
/// The field a quarantined message's body is sealed as.
pub const BODY_FIELD: &str = "body";

/// Where a login's personal field is sealed.
pub fn login_place<'a>(field: Field, message_id: &'a str, user_id: &'a str) -> Place<'a> {
    Place {
        table: LOGINS_TABLE,
        field: field.name(),
        message_id,
        user_id,
    }
}

/// Where a quarantined body is sealed (its user is unknown).
pub fn quarantine_place(message_id: &str) -> Place<'_> {
    Place {
        table: QUARANTINE_TABLE,
        field: BODY_FIELD,
        message_id,
        user_id: "",
    }
}

/// The table whose records seal an erased user's id.
pub const ERASURES_TABLE: &str = "erasures";
/// The object store where erasures are witnessed.
pub const ERASURE_WITNESS: &str = "erasure-witness";

/// Where an erased user's id is sealed in an erasure record: bound to the record's token, so
/// a sealed id moved to another record does not open.
pub fn erased_user_place(user_token: &str) -> Place<'_> {
    Place {
        table: ERASURES_TABLE,
        field: "user_id",
        message_id: user_token,
        user_id: "",
    }
}

/// Where an erased user's id is sealed in the witness object `name`.
pub fn witnessed_erasure_place(name: &str) -> Place<'_> {
    Place {
        table: ERASURE_WITNESS,
        field: "user_id",
        message_id: name,
        user_id: "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_name_their_table_field_row_and_user() {
        assert_eq!(
            login_place(Field::DeviceId, "m-1", "u-1"),
            Place {
                table: "user_logins",
                field: "device_id",
                message_id: "m-1",
                user_id: "u-1",
            }
        );
        assert_eq!(login_place(Field::Ip, "m-1", "u-1").field, "ip");
        assert_eq!(
            quarantine_place("m-2"),
            Place {
                table: "quarantine",
                field: "body",
                message_id: "m-2",
                user_id: "",
            }
        );
    }
}
