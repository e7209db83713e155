//! Platform properties and how an action's requirements match a worker's offer.

use std::collections::BTreeMap;
use std::fmt;

/// An offered value that satisfies any wanted value of its property.
pub const ANY_VALUE: &str = "*";

/// A set of platform properties. A name may carry several values (a worker can offer
/// `OSFamily=linux` and `container-image=a` and `container-image=b`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Platform {
    properties: BTreeMap<String, Vec<String>>,
}

impl Platform {
    pub fn new<I, K, V>(pairs: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let mut properties: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, value) in pairs {
            let values = properties.entry(name.into()).or_default();
            let value = value.into();
            if !values.contains(&value) {
                values.push(value);
                values.sort();
            }
        }
        Platform { properties }
    }

    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.properties
            .iter()
            .flat_map(|(name, values)| values.iter().map(move |v| (name.as_str(), v.as_str())))
    }

    /// Whether a worker offering `self` can run an action that requires `required`.
    ///
    /// Every required property must be offered. An offered `*` takes any value (a worker
    /// that can run any image offers `container-image=*`). A value that parses as a number
    /// on both sides is a minimum (`cores=4` runs on a worker with `cores=8`); anything
    /// else must match exactly.
    pub fn satisfies(&self, required: &Platform) -> bool {
        required.properties.iter().all(|(name, wanted)| {
            let Some(offered) = self.properties.get(name) else {
                return false;
            };
            wanted
                .iter()
                .all(|want| offered.iter().any(|offer| value_satisfies(offer, want)))
        })
    }
}

fn value_satisfies(offered: &str, wanted: &str) -> bool {
    if offered == ANY_VALUE {
        return true;
    }
    match (offered.parse::<f64>(), wanted.parse::<f64>()) {
        (Ok(offered), Ok(wanted)) => offered >= wanted,
        _ => offered == wanted,
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (name, value) in self.pairs() {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{name}={value}")?;
        }
        if first {
            f.write_str("(any)")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_numeric_minimum_matching() {
        let worker = Platform::new([("OSFamily", "linux"), ("cores", "8"), ("mem-gb", "16")]);
        assert!(worker.satisfies(&Platform::default()));
        assert!(worker.satisfies(&Platform::new([("OSFamily", "linux"), ("cores", "4")])));
        assert!(worker.satisfies(&Platform::new([("cores", "8")])));
        assert!(!worker.satisfies(&Platform::new([("cores", "9")])));
        assert!(!worker.satisfies(&Platform::new([("OSFamily", "windows")])));
        assert!(!worker.satisfies(&Platform::new([("gpu", "1")])));
    }

    #[test]
    fn multi_valued_offers() {
        let worker = Platform::new([("image", "a"), ("image", "b")]);
        assert!(worker.satisfies(&Platform::new([("image", "b")])));
        assert!(!worker.satisfies(&Platform::new([("image", "c")])));
        assert_eq!(worker.to_string(), "image=a,image=b");
    }

    #[test]
    fn an_offered_star_takes_any_value_of_its_property_only() {
        let worker = Platform::new([("container-image", "*"), ("OSFamily", "linux")]);
        assert!(worker.satisfies(&Platform::new([(
            "container-image",
            "docker://registry:5000/gcc@sha256:00"
        )])));
        assert!(worker.satisfies(&Platform::default()));
        assert!(!worker.satisfies(&Platform::new([("gpu", "1")])));
    }
}
