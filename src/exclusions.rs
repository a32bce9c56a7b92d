//! Domains vmbalance leaves alone: those the operator names with `--exclude` (a name glob or a
//! UUID), and those that ask for it in their own libvirt metadata, so that a guest managed by
//! another orchestrator, or running real-time work, is left alone across daemon restarts:
//!
//! ```sh
//! virsh metadata DOMAIN --uri http://vmbalance.org/xmlns/libvirt/1.0 --key vmbalance \
//!     --set '<policy exclude="yes"/>' --live --config
//! ```
//!
//! An excluded domain is read, never changed: the vCPU scheduler still counts its vCPUs as load
//! on the pCPUs they run on, and the memory coordinator never resizes its balloon.

use std::collections::HashMap;

use crate::host::{DomainId, DomainRef};

/// The XML namespace of vmbalance's element in a domain's metadata.
pub const METADATA_URI: &str = "http://vmbalance.org/xmlns/libvirt/1.0";

/// What a domain's vmbalance metadata element (as `virDomainGetMetadata` returns it) asks for:
///
/// ```xml
/// <policy exclude="yes" guaranteed-mib="1024"/>
/// ```
///
/// `exclude` (`yes`, `true` or `1`): leave the domain alone. `guaranteed-mib`: the memory
/// coordinator never shrinks its balloon under this many MiB (oVirt's "guaranteed memory").
/// Anything else, or XML that does not parse, asks for nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DomainMetadata {
    /// The domain asks to be left alone.
    pub exclude: bool,
    /// No shrink takes its balloon under this, KiB (0: no guarantee).
    pub guaranteed_kib: u64,
}

impl DomainMetadata {
    /// Read vmbalance's metadata element.
    pub fn parse(xml: &str) -> Self {
        let Ok(doc) = roxmltree::Document::parse(xml) else {
            return Self::default();
        };
        let root = doc.root_element();
        Self {
            exclude: root
                .attribute("exclude")
                .is_some_and(|v| matches!(v.trim(), "yes" | "true" | "1")),
            guaranteed_kib: root
                .attribute("guaranteed-mib")
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map_or(0, |mib| mib.min(1 << 40).saturating_mul(1024)),
        }
    }
}

/// One `--exclude` argument.
#[derive(Clone, Debug)]
enum Pattern {
    Uuid(DomainId),
    Name(glob::Pattern),
}

impl Pattern {
    /// A domain UUID, else a glob over domain names (`*`, `?`, `[…]`).
    fn new(text: &str) -> Result<Self, String> {
        if let Some(id) = DomainId::parse(text) {
            return Ok(Self::Uuid(id));
        }
        glob::Pattern::new(text)
            .map(Self::Name)
            .map_err(|e| format!("'{text}' is neither a UUID nor a valid name pattern: {e}"))
    }
}

/// Check one `--exclude` value (see [`Exclusions::new`]).
pub fn parse_pattern(text: &str) -> Result<String, String> {
    Pattern::new(text).map(|_| text.to_string())
}

/// Why a domain is left alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// An `--exclude` argument names it.
    Flag(String),
    /// Its own metadata asks for it.
    Metadata,
}

/// The domains to leave alone, said once per domain at first sight.
#[derive(Clone, Debug, Default)]
pub struct Exclusions {
    patterns: Vec<(String, Pattern)>,
    /// Domains found excluded, and the cycle they were last seen in (forgotten when not seen).
    announced: HashMap<DomainId, u64>,
    cycle: u64,
}

impl Exclusions {
    /// Exclusions from `--exclude` values: each a domain UUID, else a glob over domain names.
    pub fn new(patterns: &[String]) -> Result<Self, String> {
        let patterns = patterns
            .iter()
            .map(|text| Ok((text.clone(), Pattern::new(text)?)))
            .collect::<Result<_, String>>()?;
        Ok(Self {
            patterns,
            ..Self::default()
        })
    }

    /// Why `domain` is left alone, if it is.
    pub fn reason(&self, domain: &DomainRef) -> Option<Reason> {
        if domain.opted_out {
            return Some(Reason::Metadata);
        }
        self.patterns
            .iter()
            .find(|(_, p)| match p {
                Pattern::Uuid(id) => *id == domain.id,
                Pattern::Name(glob) => glob.matches(&domain.name),
            })
            .map(|(text, _)| Reason::Flag(text.clone()))
    }

    /// Start a cycle.
    pub fn begin_cycle(&mut self) {
        self.cycle += 1;
    }

    /// Is `domain` to be left alone? Said in the log the first time it is seen so.
    pub fn excludes(&mut self, domain: &DomainRef) -> bool {
        let Some(reason) = self.reason(domain) else {
            return false;
        };
        if self.announced.insert(domain.id, self.cycle).is_none() {
            match reason {
                Reason::Flag(pattern) => log::info!(
                    "domain {} is excluded by --exclude '{pattern}': read, never changed",
                    domain.name
                ),
                Reason::Metadata => log::info!(
                    "domain {} asks to be left alone in its vmbalance metadata: read, never changed",
                    domain.name
                ),
            }
        }
        true
    }

    /// End a cycle: forget excluded domains not seen in it (said again if they come back).
    pub fn end_cycle(&mut self) {
        let current = self.cycle;
        self.announced.retain(|_, seen| *seen == current);
    }

    /// No exclusion at all (no `--exclude`)?
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(name: &str, id: u8, opted_out: bool) -> DomainRef {
        DomainRef {
            opted_out,
            ..DomainRef::new(DomainId([id; 16]), name)
        }
    }

    #[test]
    fn names_by_glob_uuids_exactly_and_metadata_always() {
        let uuid = DomainId([7; 16]).to_string();
        let ex = Exclusions::new(&["rt-*".into(), uuid]).unwrap();
        assert_eq!(
            ex.reason(&domain("rt-db", 1, false)),
            Some(Reason::Flag("rt-*".into()))
        );
        assert_eq!(ex.reason(&domain("web", 1, false)), None);
        assert!(ex.reason(&domain("web", 7, false)).is_some());
        assert_eq!(ex.reason(&domain("web", 2, true)), Some(Reason::Metadata));
    }

    #[test]
    fn bad_patterns_are_refused() {
        assert!(parse_pattern("[").is_err());
        assert!(parse_pattern("web-[0-9]").is_ok());
    }

    #[test]
    fn metadata_asks_with_exclude_yes_and_guarantees_in_mib() {
        let ns = format!("xmlns=\"{METADATA_URI}\"");
        let m = DomainMetadata::parse(&format!(
            "<policy {ns} exclude=\"yes\" guaranteed-mib=\"1024\"/>"
        ));
        assert_eq!(
            m,
            DomainMetadata {
                exclude: true,
                guaranteed_kib: 1024 * 1024
            }
        );
        assert!(DomainMetadata::parse("<policy exclude='true'/>").exclude);
        assert!(!DomainMetadata::parse("<policy exclude=\"no\"/>").exclude);
        assert_eq!(
            DomainMetadata::parse("<policy guaranteed-mib='lots'/>"),
            DomainMetadata::default()
        );
        assert_eq!(DomainMetadata::parse("not xml"), DomainMetadata::default());
    }
}
