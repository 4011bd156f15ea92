//! Values that cross into SQL as fixed text: a key's state and purpose, a reveal's purpose and
//! outcome, a door's operation, a retention window's state. Each is an enum made by
//! `sql_text!`, whose `ALL` lists every value, so that a test can hold the list the database
//! keeps (a CHECK constraint, a door's body) to the one Rust has, and a value added on one side
//! alone fails.

/// Defines an enum of fixed texts: `as_str`, `parse`, `ALL` (in the order declared), `Display`,
/// and sqlx's text encoding, so a row's column decodes into it (an unknown text is a decode
/// error, never a default) and it binds where a text is expected.
///
/// ```ignore
/// sql_text! {
///     /// What a key is for.
///     pub enum Purpose {
///         Token => "token",
///         Data => "data",
///     }
/// }
/// ```
macro_rules! sql_text {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $($(#[$variant_meta:meta])* $variant:ident => $text:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name {
            $($(#[$variant_meta])* $variant,)+
        }

        impl $name {
            /// Every value, in the order declared.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The text SQL stores or is handed.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            /// The value `text` stands for, if it is one.
            pub fn parse(text: &str) -> Option<Self> {
                match text {
                    $($text => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl ::sqlx::Type<::sqlx::Postgres> for $name {
            fn type_info() -> ::sqlx::postgres::PgTypeInfo {
                <&str as ::sqlx::Type<::sqlx::Postgres>>::type_info()
            }

            fn compatible(ty: &::sqlx::postgres::PgTypeInfo) -> bool {
                <&str as ::sqlx::Type<::sqlx::Postgres>>::compatible(ty)
            }
        }

        impl<'r> ::sqlx::Decode<'r, ::sqlx::Postgres> for $name {
            fn decode(
                value: ::sqlx::postgres::PgValueRef<'r>,
            ) -> Result<Self, ::sqlx::error::BoxDynError> {
                let text = <&str as ::sqlx::Decode<::sqlx::Postgres>>::decode(value)?;
                Self::parse(text)
                    .ok_or_else(|| format!("{text:?} is not a {}", stringify!($name)).into())
            }
        }

        impl ::sqlx::Encode<'_, ::sqlx::Postgres> for $name {
            fn encode_by_ref(
                &self,
                buf: &mut ::sqlx::postgres::PgArgumentBuffer,
            ) -> Result<::sqlx::encode::IsNull, ::sqlx::error::BoxDynError> {
                <&str as ::sqlx::Encode<::sqlx::Postgres>>::encode_by_ref(&self.as_str(), buf)
            }
        }
    };
}

pub(crate) use sql_text;

#[cfg(test)]
mod tests {
    sql_text! {
        /// Two values, for the macro's own test.
        enum Pair {
            First => "first",
            Second => "second-one",
        }
    }

    #[test]
    fn every_value_round_trips_through_its_text() {
        assert_eq!(Pair::ALL, [Pair::First, Pair::Second]);
        for value in Pair::ALL {
            assert_eq!(Pair::parse(value.as_str()), Some(*value));
        }
        assert_eq!(Pair::parse("third"), None);
        assert_eq!(Pair::parse("First"), None, "the text exactly, not the name");
        assert_eq!(format!("[{:<12}]", Pair::Second), "[second-one  ]");
    }
}
