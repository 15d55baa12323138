//! Authentication of the controller-to-node channel: a shared token, sent as
//! `authorization: Bearer <token>` on every call and checked in constant time before the
//! call reaches a service. In Kubernetes the token is a Secret mounted into the controller
//! and every node plugin; a process that does not have it can neither reach a node's
//! volumes nor register as a node.

use std::path::Path;
use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Shortest token accepted: 128 bits of hex or base64 text.
pub const MIN_TOKEN_LEN: usize = 16;

/// The shared secret.
#[derive(Clone)]
pub struct Token(Arc<str>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// A token from its text (surrounding white space ignored).
    pub fn new(text: &str) -> Result<Token, String> {
        let t = text.trim();
        if t.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "the token is {} characters long; use at least {MIN_TOKEN_LEN} (for example `head -c 32 /dev/urandom | base64`)",
                t.len()
            ));
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the token must be printable ASCII without spaces".into());
        }
        Ok(Token(t.into()))
    }

    /// Reads the token from a file (a mounted Secret).
    pub fn from_file(path: &Path) -> Result<Token, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?;
        Token::new(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// A random token, for an all-in-one process that talks only to itself.
    pub fn random() -> Token {
        let mut b = [0u8; 24];
        // SAFETY: getrandom writes at most b.len() bytes into the live buffer.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        assert_eq!(n, b.len() as isize, "getrandom failed");
        Token(
            b.iter()
                .map(|x| format!("{x:02x}"))
                .collect::<String>()
                .into(),
        )
    }

    /// The server side: refuses a call without this token.
    pub fn checker(&self) -> impl Interceptor + Clone {
        let want = format!("Bearer {}", self.0);
        move |req: Request<()>| {
            let got = req
                .metadata()
                .get("authorization")
                .map(|v| v.as_bytes())
                .unwrap_or_default();
            if bool::from(got.ct_eq(want.as_bytes())) {
                Ok(req)
            } else {
                Err(Status::unauthenticated(
                    "missing or wrong token: this API is for snapblk's controller and node plugins only",
                ))
            }
        }
    }

    /// The client side: adds this token to every call.
    pub fn bearer(&self) -> Bearer {
        // A printable ASCII token always makes a valid header value.
        let v = MetadataValue::try_from(format!("Bearer {}", self.0))
            .unwrap_or_else(|_| MetadataValue::from_static(""));
        Bearer(v)
    }
}

/// Adds the token to a client's calls.
#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checker_accepts_only_the_token() {
        let t = Token::new("0123456789abcdef0123").expect("token");
        let mut check = t.checker();
        let mut add = t.bearer();
        let ok = add.call(Request::new(())).expect("add");
        assert!(check.call(ok).is_ok());
        assert_eq!(
            check.call(Request::new(())).expect_err("none").code(),
            tonic::Code::Unauthenticated
        );
        let mut other = Token::new("0123456789abcdef0124").expect("t2").bearer();
        let wrong = other.call(Request::new(())).expect("add");
        assert!(check.call(wrong).is_err());
    }

    #[test]
    fn short_or_odd_tokens_are_refused() {
        assert!(Token::new("short").is_err());
        assert!(Token::new("has a space in it, long enough").is_err());
        assert!(Token::new("  0123456789abcdef\n").is_ok());
        assert_ne!(Token::random().0, Token::random().0);
    }
}
