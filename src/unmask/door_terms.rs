//! The reveal door's fixed texts: what a reveal hands `vault_reveal_request` (its question and
//! purpose) and `vault_reveal_outcome` (how it ended), and what the door answers. The database
//! keeps each list too (`audit_reveal_purposes()`, the doors' bodies); the integration test
//! `sql_lists` holds them to `ALL` here.

use crate::sql_text::sql_text;

sql_text! {
    /// Why a compliance officer may ask for values (`audit_reveal_purposes()`); the door
    /// refuses any other. The `unmask` binary takes it as `--purpose`.
    #[derive(clap::ValueEnum)]
    pub enum RevealPurpose {
        /// A data subject asked for their data (GDPR art. 15).
        DataSubjectAccess => "data-subject-access",
        FraudInvestigation => "fraud-investigation",
        SecurityIncident => "security-incident",
        /// A court order or a regulator's request.
        LegalRequest => "legal-request",
        /// Helping the user regain access to their account.
        AccountRecovery => "account-recovery",
    }
}

impl RevealPurpose {
    /// Every purpose, as a list for a message: `a, b, c`.
    pub fn listed() -> String {
        let names: Vec<_> = Self::ALL.iter().map(|p| p.as_str()).collect();
        names.join(", ")
    }
}

sql_text! {
    /// What a reveal asks by: the door's question, a column of `user_logins`.
    pub enum QuestionKind {
        UserId => "user_id",
        MaskedIp => "masked_ip",
        MaskedDeviceId => "masked_device_id",
    }
}

sql_text! {
    /// How a hand-out ended, as `vault_reveal_outcome` records it in the audit.
    pub enum RevealOutcome {
        /// The values were opened and are shown.
        Revealed => "revealed",
        /// A value did not open or did not match: nothing is shown.
        IntegrityFailure => "integrity-failure",
        /// KMS refused to unwrap a handed-out key.
        KmsRefused => "kms-refused",
        /// The keys could not be had (KMS throttled or unreachable, the database failed).
        KeysUnavailable => "keys-unavailable",
    }
}

sql_text! {
    /// What the reveal door answers a request (`vault_reveal_request`, recorded in the audit
    /// and handed back by `vault_reveal`).
    pub enum RequestOutcome {
        /// The logins asked for, with their sealed values and keys.
        HandedOut => "handed-out",
        /// No login matches the question.
        NothingFound => "nothing-found",
        /// The caller does not hold the compliance officer's role.
        RefusedRole => "refused-role",
        /// A reason, actor or value past the audit's limits.
        RefusedInput => "refused-input",
        /// A purpose not in the list.
        RefusedPurpose => "refused-purpose",
        /// No reason given.
        RefusedReason => "refused-reason",
        /// No question, or an unknown one.
        RefusedQuestion => "refused-question",
    }
}

#[cfg(test)]
mod tests {
    use clap::ValueEnum;

    use super::*;

    /// `--purpose` takes exactly the texts the door is handed.
    #[test]
    fn the_command_line_names_purposes_as_the_door_does() {
        for purpose in RevealPurpose::ALL {
            let named = purpose
                .to_possible_value()
                .expect("every purpose has a name");
            assert_eq!(named.get_name(), purpose.as_str());
        }
        assert_eq!(RevealPurpose::value_variants(), RevealPurpose::ALL);
    }
}
