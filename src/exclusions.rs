//! Domains vmbalance leaves alone: those the operator names with `--exclude` (a name glob or a
//! UUID), and those that ask for it in their own libvirt metadata, so that a guest managed by
//! another orchestrator, or running real-time work, is left alone across daemon restarts:
//!
//! ```sh
//! virsh metadata DOMAIN --uri http://vmbalance.org/xmlns/libvirt/1.0 --key vmbalance \
//!     --set '<policy exclude="yes"/>' --live --config
//! ```
//!
//! (the metadata is read with the domain's XML: [`crate::domain_xml::DomainFacts::opted_out`]).
//! An excluded domain is read, never changed: the vCPU scheduler still counts its vCPUs as load
//! on the pCPUs they run on, and the memory coordinator never resizes its balloon.

use crate::host::{DomainId, DomainRef};

/// What one `--exclude` argument matches.
#[derive(Clone, Debug)]
enum Matcher {
    Uuid(DomainId),
    Name(glob::Pattern),
}

/// One `--exclude` argument, parsed: a domain UUID, else a glob over domain names.
#[derive(Clone, Debug)]
pub struct ExcludePattern {
    text: String,
    matcher: Matcher,
}

impl ExcludePattern {
    /// A domain UUID, else a glob over domain names (`*`, `?`, `[…]`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let matcher = match DomainId::parse(text) {
            Some(id) => Matcher::Uuid(id),
            None => glob::Pattern::new(text)
                .map(Matcher::Name)
                .map_err(|e| format!("'{text}' is neither a UUID nor a valid name pattern: {e}"))?,
        };
        Ok(Self {
            text: text.to_string(),
            matcher,
        })
    }

    /// Does it name `domain`?
    fn matches(&self, domain: &DomainRef) -> bool {
        match &self.matcher {
            Matcher::Uuid(id) => *id == domain.id,
            Matcher::Name(glob) => glob.matches(&domain.name),
        }
    }
}

/// Why a domain is left alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// An `--exclude` argument names it.
    Flag(String),
    /// Its own metadata asks for it.
    Metadata,
}

/// The domains to leave alone. It keeps no state: whether an exclusion was said is in each
/// daemon's record of the domain.
#[derive(Clone, Debug, Default)]
pub struct Exclusions {
    patterns: Vec<ExcludePattern>,
}

impl Exclusions {
    /// Exclusions from `--exclude` values.
    pub fn new(patterns: Vec<ExcludePattern>) -> Self {
        Self { patterns }
    }

    /// Why `domain` is left alone, if it is.
    pub fn reason(&self, domain: &DomainRef) -> Option<Reason> {
        if domain.facts.opted_out {
            return Some(Reason::Metadata);
        }
        self.patterns
            .iter()
            .find(|p| p.matches(domain))
            .map(|p| Reason::Flag(p.text.clone()))
    }

    /// Is `domain` to be left alone? Said in the log when it becomes so: `said` is whether it was
    /// left alone at its last sight (kept in the daemon's record of the domain), updated here.
    pub fn excludes(&self, domain: &DomainRef, said: &mut bool) -> bool {
        let reason = self.reason(domain);
        if let Some(reason) = &reason
            && !*said
        {
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
        *said = reason.is_some();
        reason.is_some()
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
        let mut domain = DomainRef::new(DomainId([id; 16]), name);
        domain.facts.opted_out = opted_out;
        domain
    }

    #[test]
    fn names_by_glob_uuids_exactly_and_metadata_always() {
        let uuid = DomainId([7; 16]).to_string();
        let ex = Exclusions::new(vec![
            ExcludePattern::parse("rt-*").unwrap(),
            ExcludePattern::parse(&uuid).unwrap(),
        ]);
        assert_eq!(
            ex.reason(&domain("rt-db", 1, false)),
            Some(Reason::Flag("rt-*".into()))
        );
        assert_eq!(ex.reason(&domain("web", 1, false)), None);
        assert!(ex.reason(&domain("web", 7, false)).is_some());
        assert_eq!(ex.reason(&domain("web", 2, true)), Some(Reason::Metadata));
    }

    #[test]
    fn an_exclusion_is_said_when_it_begins() {
        let ex = Exclusions::new(vec![ExcludePattern::parse("rt-*").unwrap()]);
        let mut said = false;
        assert!(ex.excludes(&domain("rt-db", 1, false), &mut said));
        assert!(said);
        // Its metadata no longer asks, nor does a flag: not excluded, and said again if it is.
        assert!(!ex.excludes(&domain("db", 1, false), &mut said));
        assert!(!said);
    }

    #[test]
    fn bad_patterns_are_refused() {
        assert!(ExcludePattern::parse("[").is_err());
        assert!(ExcludePattern::parse("web-[0-9]").is_ok());
    }
}
