//! Hand-built pieces of the OpenAPI schema that derive macros cannot express:
//! CEL rules (`x-kubernetes-validations`) so the API server itself rejects a
//! bad object at `kubectl apply` time with a message naming the field. No
//! admission webhook is involved, so a broken webhook can never block applies.

use schemars::{Schema, SchemaGenerator, json_schema};
use serde_json::{Value, json};

/// Longest accepted `spec.addresses` entry: two full IPv6 addresses, a dash
/// and some spaces. Bounds keep the CEL cost estimate small.
const MAX_ADDRESS_LEN: u64 = 100;
const MAX_ADDRESSES: u64 = 128;
const MAX_SELECTORS: u64 = 16;

/// `spec.addresses`: CIDRs or inclusive ranges, IPv4 and IPv6 mixed.
pub fn address_list(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "minItems": 1,
        "maxItems": MAX_ADDRESSES,
        "description": "Addresses this pool hands out. Each entry is a CIDR (198.18.8.0/24, 2001:db8::8:0/112) or an inclusive range of one family (198.18.9.10-198.18.9.20). IPv4 and IPv6 entries may be mixed in one pool.",
        "items": {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_ADDRESS_LEN,
            "x-kubernetes-validations": address_rules(),
        },
    })
}

/// CEL for one address entry; mirrors `addresses::IpRange::from_str`.
fn address_rules() -> Value {
    let a = "self.split('-')[0].trim()";
    let b = "self.split('-')[1].trim()";
    let two_ips = format!("self.split('-').size() == 2 && isIP({a}) && isIP({b})");
    let same_family = format!("ip({a}).family() == ip({b}).family()");
    // CEL has no ordering on IPs, so IPv4 ends are compared as numbers built
    // from their octets. IPv6 ranges get the same check from the controller
    // (an `Invalid` pool condition naming the entry): the bitwise CEL
    // equivalent exceeds the API server's cost budget by orders of magnitude.
    let number = |x: &str| {
        (0..4)
            .map(|i| format!("int({x}.split('.')[{i}]) * {}", 1u64 << (8 * (3 - i))))
            .collect::<Vec<_>>()
            .join(" + ")
    };
    let ordered = format!("ip({a}).family() == 6 || {} <= {}", number(a), number(b));
    json!([
        {
            "rule": format!("isCIDR(self) || ({two_ips})"),
            "message": "must be a CIDR such as 198.18.8.0/24 or an inclusive range such as 198.18.9.10-198.18.9.20",
        },
        {
            "rule": format!("isCIDR(self) || !({two_ips}) || {same_family}"),
            "message": "both ends of a range must be of the same IP family",
        },
        {
            "rule": format!("isCIDR(self) || !({two_ips} && {same_family}) || {ordered}"),
            "message": "an IPv4 range must not end before it starts",
        },
    ])
}

/// A Kubernetes label selector with the checks the API server applies to
/// built-in selectors: known operators, values only where they mean something,
/// well-formed label keys and values.
pub fn label_selector(description: &str) -> Value {
    const KEY: &str = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$";
    const VALUE: &str = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$";
    json!({
        "type": "object",
        "description": description,
        "x-kubernetes-map-type": "atomic",
        "properties": {
            "matchLabels": {
                "type": "object",
                "description": "Labels that must all be present with exactly these values.",
                "maxProperties": 64,
                "additionalProperties": {"type": "string", "maxLength": 63, "pattern": VALUE},
                "x-kubernetes-validations": [{
                    "rule": format!("self.all(k, size(k) <= 317 && k.matches('{}'))", KEY.replace('\\', "\\\\")),
                    "message": "label keys must be a DNS-1123 subdomain prefix and '/' (optional) followed by a name of at most 63 alphanumerics, '-', '_' or '.'",
                }],
            },
            "matchExpressions": {
                "type": "array",
                "description": "Requirements that must all hold.",
                "maxItems": 32,
                "items": {
                    "type": "object",
                    "required": ["key", "operator"],
                    "properties": {
                        "key": {"type": "string", "minLength": 1, "maxLength": 317, "pattern": KEY, "description": "Label key the requirement applies to."},
                        "operator": {"type": "string", "enum": ["In", "NotIn", "Exists", "DoesNotExist"], "description": "In, NotIn, Exists or DoesNotExist."},
                        "values": {"type": "array", "maxItems": 64, "items": {"type": "string", "maxLength": 63, "pattern": VALUE}, "description": "Values for In and NotIn; must be empty for Exists and DoesNotExist."},
                    },
                    "x-kubernetes-validations": [
                        {"rule": "!(self.operator in ['In', 'NotIn']) || (has(self.values) && size(self.values) > 0)", "message": "In and NotIn need at least one value", "fieldPath": ".values"},
                        {"rule": "self.operator in ['In', 'NotIn'] || !has(self.values) || size(self.values) == 0", "message": "Exists and DoesNotExist take no values", "fieldPath": ".values"},
                    ],
                },
            },
        },
    })
}

/// A list of label selectors, as MetalLB's `*Selectors` fields are.
pub fn selector_list(description: &str) -> Schema {
    let mut schema = json_schema!({
        "type": "array",
        "maxItems": MAX_SELECTORS,
    });
    schema.insert("description".into(), json!(description));
    schema.insert(
        "items".into(),
        label_selector("A label selector; an empty selector matches everything."),
    );
    schema
}

/// A list of names of other objects (DNS-1123 subdomains).
pub fn name_list(description: &str, max_len: u64) -> Schema {
    let mut schema = json_schema!({
        "type": "array",
        "maxItems": 64,
        "items": {
            "type": "string",
            "minLength": 1,
            "maxLength": max_len,
            "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
        },
    });
    schema.insert("description".into(), json!(description));
    schema
}
