//! Tests of the image reference grammar: tables of accepted and refused references (one row a
//! line), their normalised display, error messages, and the registry-URL joining rules.

use super::*;

macro_rules! hex64 {
    () => {
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    };
}
const HEX64: &str = hex64!();
const SHA256: &str = concat!("sha256:", hex64!());
const SHA384: &str = concat!("sha384:", hex64!(), "0123456789abcdef0123456789abcdef");
const SHA512: &str = concat!("sha512:", hex64!(), hex64!());

/// The variant name, so tables can say which kind of error they expect.
fn kind(err: &ReferenceError) -> &'static str {
    match err {
        ReferenceError::Empty => "Empty",
        ReferenceError::MissingName { .. } => "MissingName",
        ReferenceError::AmbiguousHexName { .. } => "AmbiguousHexName",
        ReferenceError::InvalidRegistry { .. } => "InvalidRegistry",
        ReferenceError::UppercaseRepository { .. } => "UppercaseRepository",
        ReferenceError::InvalidRepository { .. } => "InvalidRepository",
        ReferenceError::NameTooLong { .. } => "NameTooLong",
        ReferenceError::InvalidTag { .. } => "InvalidTag",
        ReferenceError::InvalidDigest { .. } => "InvalidDigest",
        ReferenceError::UnsupportedDigestAlgorithm { .. } => "UnsupportedDigestAlgorithm",
        ReferenceError::NotDockerHub { .. } => "NotDockerHub",
        ReferenceError::RegistryMismatch { .. } => "RegistryMismatch",
        ReferenceError::UnsupportedScheme { .. } => "UnsupportedScheme",
        ReferenceError::UrlCredentials { .. } => "UrlCredentials",
        ReferenceError::InvalidRegistryUrl { .. } => "InvalidRegistryUrl",
    }
}

/// (input, registry, repository, tag, digest)
type Valid = (String, String, String, Option<String>, Option<String>);

fn ok(
    input: &str,
    registry: &str,
    repository: &str,
    tag: Option<&str>,
    digest: Option<&str>,
) -> Valid {
    (
        input.to_string(),
        registry.to_string(),
        repository.to_string(),
        tag.map(str::to_string),
        digest.map(str::to_string),
    )
}

fn assert_parts(what: &str, got: &Reference, want: &Valid) {
    let (_, registry, repository, tag, digest) = want;
    assert_eq!(got.registry(), registry, "registry of {what}");
    assert_eq!(got.repository(), repository, "repository of {what}");
    assert_eq!(got.tag(), tag.as_deref(), "tag of {what}");
    assert_eq!(got.digest(), digest.as_deref(), "digest of {what}");
}

#[test]
fn parse_accepts_valid_references_and_normalises_them() {
    let latest = Some("latest");
    let long_path = format!("{}a", "a/".repeat(122)); // "localhost/" + 245 = 255
    #[rustfmt::skip]
    let cases = vec![
        // distribution's reference_test.go, normalised as docker pull does
        ok("test_com", "docker.io", "library/test_com", latest, None),
        ok("test.com:tag", "docker.io", "library/test.com", Some("tag"), None),
        ok("test.com:5000", "docker.io", "library/test.com", Some("5000"), None),
        ok("test.com/repo:tag", "test.com", "repo", Some("tag"), None),
        ok("test:5000/repo", "test:5000", "repo", latest, None),
        ok("test:5000/repo:tag", "test:5000", "repo", Some("tag"), None),
        ok(&format!("test:5000/repo@{SHA256}"), "test:5000", "repo", None, Some(SHA256)),
        ok(&format!("test:5000/repo:tag@{SHA256}"), "test:5000", "repo", Some("tag"), Some(SHA256)),
        ok("lowercase:Uppercase", "docker.io", "library/lowercase", Some("Uppercase"), None),
        ok("sub-dom1.foo.com/bar/baz/quux:some-long-tag", "sub-dom1.foo.com", "bar/baz/quux", Some("some-long-tag"), None),
        ok("b.gcr.io/test.example.com/my-app:test.example.com", "b.gcr.io", "test.example.com/my-app", Some("test.example.com"), None),
        ok("xn--n3h.com/myimage:xn--n3h.com", "xn--n3h.com", "myimage", Some("xn--n3h.com"), None),
        ok(&format!("xn--7o8h.com/myimage:xn--7o8h.com@{SHA512}"), "xn--7o8h.com", "myimage", Some("xn--7o8h.com"), Some(SHA512)),
        ok("foo_bar.com:8080", "docker.io", "library/foo_bar.com", Some("8080"), None),
        ok("foo/foo_bar.com:8080", "docker.io", "foo/foo_bar.com", Some("8080"), None),
        ok("192.168.1.1", "docker.io", "library/192.168.1.1", latest, None),
        ok("192.168.1.1/repo", "192.168.1.1", "repo", latest, None),
        ok("192.168.1.1:5000/repo:5050", "192.168.1.1:5000", "repo", Some("5050"), None),
        ok("127.0.0.1:5000/docker/docker", "127.0.0.1:5000", "docker/docker", latest, None),
        ok("[2001:db8::1]/repo", "[2001:db8::1]", "repo", latest, None),
        ok("[2001:db8:1:2:3:4:5:6]/repo:tag", "[2001:db8:1:2:3:4:5:6]", "repo", Some("tag"), None),
        ok(&format!("[2001:db8::1]:5000/repo:tag@{SHA256}"), "[2001:db8::1]:5000", "repo", Some("tag"), Some(SHA256)),
        ok("[2001:db8::]:5000/repo", "[2001:db8::]:5000", "repo", latest, None),
        ok("[::1]:5000/foo", "[::1]:5000", "foo", latest, None),
        ok("localhost/foo", "localhost", "foo", latest, None),
        ok("localhost:5000/foo", "localhost:5000", "foo", latest, None),
        ok("test-com:8080/foo", "test-com:8080", "foo", latest, None),
        // normalize_test.go: docker.io and its legacy name
        ok("index.docker.io/library/ubuntu", "docker.io", "library/ubuntu", latest, None),
        ok("index.docker.io/debian", "docker.io", "library/debian", latest, None),
        ok("docker.io/ubuntu", "docker.io", "library/ubuntu", latest, None),
        ok("docker.io/library/foo/bar", "docker.io", "library/foo/bar", latest, None),
        ok("mysql:5.7", "docker.io", "library/mysql", Some("5.7"), None),
        ok(&format!("org/image@{SHA256}"), "docker.io", "org/image", None, Some(SHA256)),
        ok(&format!("busybox:latest@{SHA256}"), "docker.io", "library/busybox", latest, Some(SHA256)),
        ok(&format!("foo@{SHA384}"), "docker.io", "library/foo", None, Some(SHA384)),
        // an uppercase first element is a registry, as in distribution
        ok("UPPERCASEDOMAIN.com/repo", "UPPERCASEDOMAIN.com", "repo", latest, None),
        ok("Foo/bar", "Foo", "bar", latest, None),
        ok("DOCKER/docker", "DOCKER", "docker", latest, None),
        // path-component separators
        ok("a__b", "docker.io", "library/a__b", latest, None),
        ok("a--b", "docker.io", "library/a--b", latest, None),
        ok("docker---rules/docker", "docker.io", "docker---rules/docker", latest, None),
        ok("x/a.b_c-d", "docker.io", "x/a.b_c-d", latest, None),
        ok("d/docker", "docker.io", "d/docker", latest, None),
        ok("jess/t", "docker.io", "jess/t", latest, None),
        // 64-hex is only ambiguous as the whole input
        ok(&format!("docker.io/{HEX64}"), "docker.io", &format!("library/{HEX64}"), latest, None),
        ok(&format!("{HEX64}:v1"), "docker.io", &format!("library/{HEX64}"), Some("v1"), None),
        ok(&HEX64[..63], "docker.io", &format!("library/{}", &HEX64[..63]), latest, None),
        ok("thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev", "docker.io", "library/thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev", latest, None),
        // limits
        ok(&format!("localhost/{long_path}"), "localhost", &long_path, latest, None),
        ok(&format!("foo:{}", "t".repeat(128)), "docker.io", "library/foo", Some(&"t".repeat(128)), None),
        ok("foo:_under.score-tag", "docker.io", "library/foo", Some("_under.score-tag"), None),
    ];
    assert!(cases.len() >= 40);
    for case in &cases {
        let input = &case.0;
        let got = Reference::parse(input).unwrap_or_else(|e| panic!("{input:?} should parse: {e}"));
        assert_parts(input, &got, case);
        // The display form is itself a reference that parses to the same thing.
        let again = Reference::parse(&got.to_string())
            .unwrap_or_else(|e| panic!("display of {input:?} ({got}) should parse: {e}"));
        assert_eq!(again, got, "round trip of {input:?}");
    }
}

#[test]
fn parse_rejects_invalid_references_with_the_right_error() {
    #[rustfmt::skip]
    let cases: Vec<(String, &str)> = vec![
        (String::new(), "Empty"),
        (":justtag".into(), "MissingName"),
        (format!("@{SHA256}"), "MissingName"),
        (format!("repo@sha256:{}", "f".repeat(34)), "InvalidDigest"),
        (format!("validname@invaliddigest:{HEX64}"), "UnsupportedDigestAlgorithm"),
        (format!("foo@md5:{}", &HEX64[..32]), "UnsupportedDigestAlgorithm"),
        (format!("foo@sha256:{}", HEX64.to_uppercase()), "InvalidDigest"),
        (format!("foo@sha512:{HEX64}"), "InvalidDigest"),
        ("foo@sha256".into(), "InvalidDigest"),
        ("foo@".into(), "InvalidDigest"),
        (format!("foo@SHA256:{HEX64}"), "InvalidDigest"),
        (format!("foo@{SHA256}@{SHA256}"), "InvalidDigest"),
        ("Uppercase:tag".into(), "UppercaseRepository"),
        ("test:5000/Uppercase/lowercase:tag".into(), "UppercaseRepository"),
        ("docker.io/Foo/bar".into(), "UppercaseRepository"),
        ("docker/Docker".into(), "UppercaseRepository"),
        (format!("{}a:tag", "a/".repeat(128)), "NameTooLong"),
        // 255 characters of path, but "docker.io/" is counted too
        (format!("{}a:tag", "a/".repeat(127)), "NameTooLong"),
        (format!("localhost/{}aa", "a/".repeat(122)), "NameTooLong"),
        ("aa/asdf$$^/aa".into(), "InvalidRepository"),
        ("[2001:db8::1]".into(), "InvalidRepository"),
        ("[2001:db8::1]:5000".into(), "InvalidRepository"),
        ("[2001:db8::1]:tag".into(), "InvalidRepository"),
        ("[fe80::1%@invalidzone]:5000/repo".into(), "InvalidRepository"),
        ("[fe80::1%eth0]:5000/repo".into(), "InvalidRegistry"),
        ("[2001:db8:3:4::192.0.2.33]:5000/debian".into(), "InvalidRegistry"),
        ("[zz::1]/repo".into(), "InvalidRegistry"),
        // distribution only checks [hex and colons]; these are not IPv6 addresses
        ("[1:2:3:4:5:6:7:8:9]/repo".into(), "InvalidRegistry"),
        ("[:::1]/repo".into(), "InvalidRegistry"),
        ("[::1]x/repo".into(), "InvalidRegistry"),
        ("fc00::1:5000/debian".into(), "InvalidRegistry"),
        ("https://github.com/docker/docker".into(), "InvalidRegistry"),
        ("-docker.io/docker/docker".into(), "InvalidRegistry"),
        ("foo_bar.com/repo".into(), "InvalidRegistry"),
        ("test:abc/repo".into(), "InvalidRegistry"),
        ("a..com/repo".into(), "InvalidRegistry"),
        ("-docker".into(), "InvalidRepository"),
        ("-docker/docker".into(), "InvalidRepository"),
        ("docker-/docker".into(), "InvalidRepository"),
        ("trailing-".into(), "InvalidRepository"),
        ("docker///docker".into(), "InvalidRepository"),
        ("docker/".into(), "InvalidRepository"),
        ("a..b".into(), "InvalidRepository"),
        ("a___b".into(), "InvalidRepository"),
        ("dock_.er/docker".into(), "InvalidRegistry"),
        ("dock-.er/docker".into(), "InvalidRegistry"),
        ("____/____".into(), "InvalidRepository"),
        ("foo:bar:baz".into(), "InvalidRepository"),
        ("foo bar".into(), "InvalidRepository"),
        (HEX64.into(), "AmbiguousHexName"),
        (format!("foo:{}", "t".repeat(129)), "InvalidTag"),
        ("foo:-bad".into(), "InvalidTag"),
        ("foo:.bad".into(), "InvalidTag"),
        ("foo:".into(), "InvalidTag"),
    ];
    assert!(cases.len() >= 40);
    for (input, want) in &cases {
        match Reference::parse(input) {
            Ok(got) => panic!("{input:?} should be refused ({want}), got {got}"),
            Err(err) => assert_eq!(kind(&err), *want, "error for {input:?}: {err}"),
        }
    }
}

#[test]
fn display_is_the_full_normalised_form_with_tag_before_digest() {
    #[rustfmt::skip]
    let cases = [
        ("mysql:5.7".to_string(), "docker.io/library/mysql:5.7".to_string()),
        ("ubuntu".into(), "docker.io/library/ubuntu:latest".into()),
        ("docker.io/ubuntu".into(), "docker.io/library/ubuntu:latest".into()),
        ("index.docker.io/library/ubuntu".into(), "docker.io/library/ubuntu:latest".into()),
        (format!("host:5000/a/b@{SHA256}"), format!("host:5000/a/b@{SHA256}")),
        (format!("a/b:t@{SHA256}"), format!("docker.io/a/b:t@{SHA256}")),
        ("[::1]:5000/foo".into(), "[::1]:5000/foo:latest".into()),
    ];
    for (input, want) in &cases {
        let got = Reference::parse(input).unwrap();
        assert_eq!(&got.to_string(), want, "display of {input:?}");
        let via_from_str: Reference = input.parse().unwrap();
        assert_eq!(via_from_str, got, "FromStr of {input:?}");
    }
}

#[test]
fn error_messages_quote_the_offending_part() {
    #[rustfmt::skip]
    let cases = [
        ("foo:-bad", "invalid tag \"-bad\": a tag starts with a letter, digit or _ and has at most 128 of [A-Za-z0-9_.-]"),
        ("docker.io/Foo/bar", "repository name must be lowercase: \"Foo/bar\""),
        ("Uppercase:tag", "repository name must be lowercase: \"Uppercase\""),
        ("a___b", "component \"a___b\" has the separator \"___\""),
        ("docker///docker", "invalid repository name \"docker///docker\": it has an empty path component"),
        ("test:abc/repo", "invalid registry \"test:abc\": the port after \":\" must be digits"),
        ("[fe80::1%eth0]:5000/repo", "invalid registry \"[fe80::1%eth0]:5000\": an IPv6 address"),
        ("repo@sha256:abc", "invalid digest \"sha256:abc\": a sha256 digest has exactly 64 lowercase hex digits"),
        (":justtag", "invalid reference \":justtag\": there is no repository name"),
        (HEX64, "ambiguous with an image ID"),
        ("[2001:db8::1]:5000", "invalid repository name \"[2001:db8::1]:5000\": an IPv6 registry must be followed by \"/\""),
    ];
    for (input, want) in cases {
        let message = Reference::parse(input).unwrap_err().to_string();
        assert!(
            message.contains(want),
            "message for {input:?} was {message:?}, expected it to contain {want:?}"
        );
    }
    let too_long = Reference::parse(&format!("localhost/{}aa", "a/".repeat(122)))
        .unwrap_err()
        .to_string();
    assert!(
        too_long.contains("is 256 characters long; at most 255"),
        "{too_long}"
    );
}

#[test]
fn from_docker_hub_accepts_only_docker_hub_targets() {
    #[rustfmt::skip]
    let accepted = [
        ("mysql:5.7".to_string(), "docker.io/library/mysql:5.7".to_string()),
        ("docker.io/x/y".into(), "docker.io/x/y:latest".into()),
        ("index.docker.io/x/y:1".into(), "docker.io/x/y:1".into()),
        (format!("org/img@{SHA256}"), format!("docker.io/org/img@{SHA256}")),
    ];
    for (target, want) in &accepted {
        let got = Reference::from_docker_hub(target).unwrap_or_else(|e| panic!("{target:?}: {e}"));
        assert_eq!(&got.to_string(), want, "from_docker_hub({target:?})");
    }
    #[rustfmt::skip]
    let refused = [
        ("ghcr.io/x/y", "NotDockerHub"),
        ("localhost:5000/x", "NotDockerHub"),
        ("[::1]:5000/x", "NotDockerHub"),
        ("MyOrg/app", "UppercaseRepository"),
        ("Uppercase", "UppercaseRepository"),
        ("x//y", "InvalidRepository"),
    ];
    for (target, want) in refused {
        let err = Reference::from_docker_hub(target).unwrap_err();
        assert_eq!(kind(&err), want, "from_docker_hub({target:?}): {err}");
    }
    let message = Reference::from_docker_hub("ghcr.io/x/y")
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("\"ghcr.io\"") && message.contains("registry origin"),
        "{message}"
    );
}

#[test]
fn from_registry_joins_url_and_target_on_the_url_host() {
    // (url, target, scheme, url host, registry, repository, tag, digest)
    type Case<'a> = (
        &'a str,
        String,
        Option<Scheme>,
        &'a str,
        &'a str,
        &'a str,
        Option<&'a str>,
        Option<&'a str>,
    );
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        ("registry.example.com", "org/img:1".into(), None, "registry.example.com", "registry.example.com", "org/img", Some("1"), None),
        ("https://registry.example.com", "org/img:1".into(), Some(Scheme::Https), "registry.example.com", "registry.example.com", "org/img", Some("1"), None),
        ("HTTPS://registry.example.com/", "org/img".into(), Some(Scheme::Https), "registry.example.com", "registry.example.com", "org/img", Some("latest"), None),
        ("http://localhost:5000", "img".into(), Some(Scheme::Http), "localhost:5000", "localhost:5000", "img", Some("latest"), None),
        ("registry.example.com/team", "img:2".into(), None, "registry.example.com", "registry.example.com", "team/img", Some("2"), None),
        ("https://registry.example.com/team/sub/", "org/img".into(), Some(Scheme::Https), "registry.example.com", "registry.example.com", "team/sub/org/img", Some("latest"), None),
        ("r.example.com:5000", "r.example.com:5000/org/img:1".into(), None, "r.example.com:5000", "r.example.com:5000", "org/img", Some("1"), None),
        ("r.example.com/team", "r.example.com/team/img".into(), None, "r.example.com", "r.example.com", "team/img", Some("latest"), None),
        ("r.example.com/team", "r.example.com/img".into(), None, "r.example.com", "r.example.com", "team/img", Some("latest"), None),
        ("r.example.com", "mysql".into(), None, "r.example.com", "r.example.com", "mysql", Some("latest"), None),
        ("myhost", "img".into(), None, "myhost", "myhost", "img", Some("latest"), None),
        ("r.example.com", "r.example.com/ghcr.io/x".into(), None, "r.example.com", "r.example.com", "ghcr.io/x", Some("latest"), None),
        ("[::1]:5000", format!("org/img@{SHA256}"), None, "[::1]:5000", "[::1]:5000", "org/img", None, Some(SHA256)),
        ("r.example.com", format!("a/b:t@{SHA256}"), None, "r.example.com", "r.example.com", "a/b", Some("t"), Some(SHA256)),
        ("docker.io", "mysql".into(), None, "docker.io", "docker.io", "library/mysql", Some("latest"), None),
        ("https://index.docker.io", "mysql:5.7".into(), Some(Scheme::Https), "index.docker.io", "docker.io", "library/mysql", Some("5.7"), None),
        ("https://registry-1.docker.io", "x/y".into(), Some(Scheme::Https), "registry-1.docker.io", "docker.io", "x/y", Some("latest"), None),
        ("registry.hub.docker.com", "mysql".into(), None, "registry.hub.docker.com", "docker.io", "library/mysql", Some("latest"), None),
        ("docker.io", "docker.io/library/mysql".into(), None, "docker.io", "docker.io", "library/mysql", Some("latest"), None),
    ];
    for (url, target, scheme, host, registry, repository, tag, digest) in &cases {
        let (got_url, got) = Reference::from_registry(url, target)
            .unwrap_or_else(|e| panic!("from_registry({url:?}, {target:?}): {e}"));
        let what = format!("from_registry({url:?}, {target:?})");
        assert_eq!(got_url.scheme, *scheme, "scheme of {what}");
        assert_eq!(got_url.host, *host, "url host of {what}");
        let want = ok(target, registry, repository, *tag, *digest);
        assert_parts(&what, &got, &want);
    }
    let (url, _) = Reference::from_registry("https://r.example.com:5000/team", "img").unwrap();
    assert_eq!(url.to_string(), "https://r.example.com:5000");
}

#[test]
fn from_registry_rejects_bad_urls_and_targets() {
    let long = format!("{}a", "a/".repeat(119)); // 239: fits after "r.example.com/", not after ".../team/"
    #[rustfmt::skip]
    let cases = [
        ("ftp://r.example.com", "a/b", "UnsupportedScheme"),
        ("file:///srv/registry", "a/b", "UnsupportedScheme"),
        ("https://bob:s3cret@r.example.com", "a/b", "UrlCredentials"),
        ("bob@r.example.com", "a/b", "UrlCredentials"),
        ("https://r.example.com?x=1", "a/b", "InvalidRegistryUrl"),
        ("https://r.example.com/#frag", "a/b", "InvalidRegistryUrl"),
        ("", "a/b", "InvalidRegistryUrl"),
        ("https://", "a/b", "InvalidRegistryUrl"),
        ("/team", "a/b", "InvalidRegistryUrl"),
        ("r_example.com", "a/b", "InvalidRegistryUrl"),
        ("r.example.com:port", "a/b", "InvalidRegistryUrl"),
        ("[fe80::1%eth0]:5000", "a/b", "InvalidRegistryUrl"),
        ("r.example.com/Team", "a/b", "InvalidRegistryUrl"),
        ("r.example.com//team", "a/b", "InvalidRegistryUrl"),
        ("r.example.com", "", "Empty"),
        ("r.example.com", "ghcr.io/x/y", "RegistryMismatch"),
        ("r.example.com:5000", "r.example.com/x", "RegistryMismatch"),
        ("r.example.com", "localhost/x", "RegistryMismatch"),
        ("r.example.com", "Org/img", "UppercaseRepository"),
        ("r.example.com", ":tag", "MissingName"),
        ("r.example.com", "img:-bad", "InvalidTag"),
        ("r.example.com", "img@sha256:abc", "InvalidDigest"),
        ("r.example.com", "a//b", "InvalidRepository"),
        ("r.example.com", "r.example.com/", "InvalidRepository"),
        ("r.example.com/team", &long, "NameTooLong"),
    ];
    for (url, target, want) in cases {
        match Reference::from_registry(url, target) {
            Ok((_, got)) => {
                panic!("from_registry({url:?}, {target:?}) should fail ({want}), got {got}")
            }
            Err(err) => assert_eq!(
                kind(&err),
                want,
                "from_registry({url:?}, {target:?}): {err}"
            ),
        }
    }
    // The same long path fits without the prefix: the limit counts the joined name.
    assert!(Reference::from_registry("r.example.com", &long).is_ok());
}

#[test]
fn from_registry_messages_say_whether_url_or_target_is_at_fault() {
    // (url, target, text the message must contain)
    #[rustfmt::skip]
    let cases = [
        ("r_example.com", "a/b", "invalid registry url \"r_example.com\": host \"r_example.com\""),
        ("r.example.com/Team", "a/b", "invalid registry url \"r.example.com/Team\": its path is joined before the target, so repository name must be lowercase: \"Team\""),
        ("ftp://r.example.com", "a/b", "unsupported registry url scheme \"ftp\""),
        ("https://r.example.com?x=1", "a/b", "invalid registry url \"https://r.example.com\": a registry url must not have a query"),
        ("r.example.com", "Org/img", "repository name must be lowercase: \"Org/img\""),
        ("r.example.com", "ghcr.io/x/y", "target \"ghcr.io/x/y\" starts with registry \"ghcr.io\", but the url's registry is \"r.example.com\""),
        ("r.example.com", "img:-bad", "invalid tag \"-bad\""),
    ];
    for (url, target, want) in cases {
        let message = Reference::from_registry(url, target)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains(want),
            "from_registry({url:?}, {target:?}) said {message:?}, expected it to contain {want:?}"
        );
    }
}

#[test]
fn from_registry_never_echoes_url_credentials() {
    #[rustfmt::skip]
    let cases = [
        "https://bob:s3cret@r.example.com/team",
        "bob:s3cret@r.example.com",
        "http://bob:s3/cret@r.example.com",
        "https://bob:s3cret@r.example.com?token=x#frag",
        "https://bob:s3@cret@r.example.com",
        "ftp://bob:s3cret@r.example.com",
    ];
    for url in cases {
        let err = Reference::from_registry(url, "org/img").unwrap_err();
        assert_eq!(kind(&err), "UrlCredentials", "{url:?}");
        for shown in [err.to_string(), format!("{err:?}")] {
            for secret in ["bob", "s3", "cret"] {
                assert!(
                    !shown.contains(secret),
                    "{url:?} leaked {secret:?} in {shown:?}"
                );
            }
            assert!(shown.contains("r.example.com"), "{url:?}: {shown:?}");
        }
    }
    let query = Reference::from_registry("https://r.example.com?token=t0ps3cret", "a")
        .unwrap_err()
        .to_string();
    assert!(!query.contains("t0ps3cret"), "query leaked in {query:?}");
}

#[test]
fn api_host_is_registry_1_for_docker_hub_only() {
    #[rustfmt::skip]
    let cases = [
        ("mysql", "registry-1.docker.io"),
        ("index.docker.io/x/y", "registry-1.docker.io"),
        ("docker.io/x/y", "registry-1.docker.io"),
        ("localhost:5000/x", "localhost:5000"),
        ("[::1]:5000/x", "[::1]:5000"),
        ("ghcr.io/x/y", "ghcr.io"),
    ];
    for (input, want) in cases {
        assert_eq!(
            Reference::parse(input).unwrap().api_host(),
            want,
            "api_host of {input:?}"
        );
    }
}

#[test]
fn with_tag_and_without_digest_keep_the_name() {
    let pinned = Reference::parse(&format!("ghcr.io/x/y@{SHA256}")).unwrap();
    assert_eq!(
        pinned.with_tag("v2").unwrap().to_string(),
        format!("ghcr.io/x/y:v2@{SHA256}")
    );
    assert_eq!(pinned.without_digest().to_string(), "ghcr.io/x/y:latest");
    assert_eq!(pinned.name(), "ghcr.io/x/y");
    let both = Reference::parse(&format!("x/y:1@{SHA256}")).unwrap();
    assert_eq!(both.without_digest().to_string(), "docker.io/x/y:1");
    let err = pinned.with_tag("-bad").unwrap_err();
    assert_eq!(kind(&err), "InvalidTag");
}
