//! [`named_enum!`]: an enum each of whose values has one fixed name, written once and used
//! everywhere the value is shown or read back: the log line, `--json`, metric labels, and the
//! plot reading a run.

/// Declare an enum whose values are written as the given names: `as_str`, `Display`, serde
/// `Serialize` and `Deserialize` (an unknown name is an error), and `ALL`, every value in order.
#[macro_export]
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every value, in the order declared.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// Its name, as the log, `--json` and the metrics write it.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )+
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::serde::Serialize for $name {
            fn serialize<S: ::serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $name {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                $name::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == text)
                    .ok_or_else(|| {
                        <D::Error as ::serde::de::Error>::custom(format!(
                            "unknown {} '{text}'",
                            stringify!($name)
                        ))
                    })
            }
        }
    };
}

#[cfg(test)]
mod tests {
    crate::named_enum! {
        /// A test enum.
        pub enum Colour {
            /// Red.
            Red = "red",
            /// Light blue.
            LightBlue = "light blue",
        }
    }

    #[test]
    fn names_go_out_and_come_back() {
        assert_eq!(Colour::LightBlue.to_string(), "light blue");
        let json = serde_json::to_string(&Colour::ALL).unwrap();
        assert_eq!(json, r#"["red","light blue"]"#);
        let back: Vec<Colour> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, Colour::ALL);
        assert!(serde_json::from_str::<Colour>(r#""green""#).is_err());
    }
}
