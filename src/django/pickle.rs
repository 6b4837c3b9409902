//! A safe subset of Python's pickle (protocols 2 to 5): dicts, lists, tuples, strings, bytes,
//! numbers, booleans and None, decoded into JSON values, as Django's cache keeps a session dict.
//! Nothing is executed: a class, a reducer or any other object opcode is refused, and so are
//! nesting and memo references that would cost more memory or stack than plain session data can.

use serde_json::{Map as JsonMap, Value as Json};

use super::DjangoError;

enum Item {
    Mark,
    /// A value and its nesting depth (0 for a scalar, 1 + its deepest child for a container).
    Value(Json, u32),
}

/// Deepest nesting [`unpickle`] accepts. Dropping a `serde_json::Value` recurses once per level,
/// so a crafted pickle of lists 20 000 deep would overflow a worker's stack and abort the process.
pub const MAX_PICKLE_DEPTH: u32 = 100;

/// Most decoded data [`unpickle`] builds (string bytes plus a word per opcode): memo references
/// copy their string, so a small pickle could otherwise allocate gigabytes.
pub const MAX_PICKLE_DECODED: usize = 1 << 20;

/// Decodes a pickle holding only plain data (protocols 2–5). Never executes anything: classes,
/// reducers and other object opcodes are refused.
pub fn unpickle(data: &[u8]) -> Result<Json, DjangoError> {
    let mut stack: Vec<Item> = Vec::new();
    let mut memo: std::collections::HashMap<u64, Option<Json>> = std::collections::HashMap::new();
    let mut pos = 0usize;
    let mut decoded = 0usize;
    let take = |pos: &mut usize, n: usize| -> Result<&[u8], DjangoError> {
        let end = pos
            .checked_add(n)
            .ok_or(DjangoError::Pickle("length overflow"))?;
        let s = data
            .get(*pos..end)
            .ok_or(DjangoError::Pickle("truncated pickle"))?;
        *pos = end;
        Ok(s)
    };
    fn uint(b: &[u8]) -> u64 {
        b.iter()
            .rev()
            .fold(0u64, |acc, x| (acc << 8) | u64::from(*x))
    }
    fn pop(stack: &mut Vec<Item>) -> Result<(Json, u32), DjangoError> {
        match stack.pop() {
            Some(Item::Value(v, d)) => Ok((v, d)),
            _ => Err(DjangoError::Pickle("stack underflow")),
        }
    }
    fn pop_mark(stack: &mut Vec<Item>) -> Result<(Vec<Json>, u32), DjangoError> {
        let mut items = Vec::new();
        let mut deepest = 0;
        loop {
            match stack.pop() {
                Some(Item::Mark) => break,
                Some(Item::Value(v, d)) => {
                    deepest = deepest.max(d);
                    items.push(v);
                }
                None => return Err(DjangoError::Pickle("missing mark")),
            }
        }
        items.reverse();
        Ok((items, deepest))
    }
    /// Records that the container on top of the stack now holds a child `child_depth` deep.
    fn deepen(stack: &mut [Item], child_depth: u32) -> Result<(), DjangoError> {
        if let Some(Item::Value(_, d)) = stack.last_mut() {
            *d = (*d).max(child_depth + 1);
            if *d > MAX_PICKLE_DEPTH {
                return Err(DjangoError::PickleTooDeep);
            }
        }
        Ok(())
    }
    fn container(items: Vec<Json>, deepest: u32) -> Result<Item, DjangoError> {
        let depth = if items.is_empty() { 1 } else { deepest + 1 };
        if depth > MAX_PICKLE_DEPTH {
            return Err(DjangoError::PickleTooDeep);
        }
        Ok(Item::Value(Json::Array(items), depth))
    }
    fn set_items(stack: &mut [Item], kv: Vec<Json>) -> Result<(), DjangoError> {
        let Some(Item::Value(Json::Object(map), _)) = stack.last_mut() else {
            return Err(DjangoError::Pickle("SETITEM on a non-dict"));
        };
        let mut it = kv.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            let key = match k {
                Json::String(s) => s,
                Json::Number(n) => n.to_string(),
                _ => return Err(DjangoError::Pickle("a dict key that is not a string")),
            };
            map.insert(key, v);
        }
        Ok(())
    }
    fn append(stack: &mut [Item], items: Vec<Json>) -> Result<(), DjangoError> {
        let Some(Item::Value(Json::Array(list), _)) = stack.last_mut() else {
            return Err(DjangoError::Pickle("APPEND on a non-list"));
        };
        list.extend(items);
        Ok(())
    }
    fn text(b: &[u8]) -> Result<Json, DjangoError> {
        Ok(Json::String(
            std::str::from_utf8(b)
                .map_err(|_| DjangoError::Pickle("a string that is not UTF-8"))?
                .to_owned(),
        ))
    }
    fn int(n: i64) -> Json {
        Json::Number(n.into())
    }
    loop {
        let op = *take(&mut pos, 1)?
            .first()
            .ok_or(DjangoError::Pickle("truncated pickle"))?;
        match op {
            0x80 => {
                take(&mut pos, 1)?;
            }
            0x95 => {
                take(&mut pos, 8)?;
            }
            b'.' => return pop(&mut stack).map(|(v, _)| v),
            b'}' => stack.push(Item::Value(Json::Object(JsonMap::new()), 1)),
            b']' | b')' | 0x8f => stack.push(Item::Value(Json::Array(Vec::new()), 1)),
            b'(' => stack.push(Item::Mark),
            b'N' => stack.push(Item::Value(Json::Null, 0)),
            0x88 => stack.push(Item::Value(Json::Bool(true), 0)),
            0x89 => stack.push(Item::Value(Json::Bool(false), 0)),
            b'K' => {
                let b = take(&mut pos, 1)?;
                stack.push(Item::Value(int(i64::from(b[0])), 0));
            }
            b'M' => {
                let b = take(&mut pos, 2)?;
                stack.push(Item::Value(
                    int(i64::from(u16::from_le_bytes([b[0], b[1]]))),
                    0,
                ));
            }
            b'J' => {
                let b = take(&mut pos, 4)?;
                stack.push(Item::Value(
                    int(i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
                    0,
                ));
            }
            0x8a => {
                let n = usize::from(take(&mut pos, 1)?[0]);
                let b = take(&mut pos, n)?;
                if n > 8 {
                    return Err(DjangoError::Pickle("integer too large"));
                }
                let mut v = uint(b) as i64;
                if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                stack.push(Item::Value(int(v), 0));
            }
            b'G' => {
                let b = take(&mut pos, 8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                let f = f64::from_be_bytes(a);
                stack.push(Item::Value(
                    serde_json::Number::from_f64(f).map_or(Json::Null, Json::Number),
                    0,
                ));
            }
            0x8c | b'X' | 0x8d | b'C' | b'B' | 0x8e => {
                let width = match op {
                    0x8c | b'C' => 1,
                    b'X' | b'B' => 4,
                    _ => 8,
                };
                let n = usize::try_from(uint(take(&mut pos, width)?))
                    .map_err(|_| DjangoError::Pickle("length overflow"))?;
                let b = take(&mut pos, n)?;
                let v = if matches!(op, b'C' | b'B' | 0x8e) {
                    Json::String(String::from_utf8_lossy(b).into_owned())
                } else {
                    text(b)?
                };
                decoded = decoded.saturating_add(n);
                stack.push(Item::Value(v, 0));
            }
            0x94 | b'q' | b'r' => {
                let idx = match op {
                    0x94 => memo.len() as u64,
                    b'q' => uint(take(&mut pos, 1)?),
                    _ => uint(take(&mut pos, 4)?),
                };
                // Containers may still change after being memoized; a later reference to one
                // would need shared objects, which plain session data never has.
                let snapshot = match stack.last() {
                    Some(Item::Value(Json::Object(_) | Json::Array(_), _)) => None,
                    Some(Item::Value(v, _)) => Some(v.clone()),
                    _ => return Err(DjangoError::Pickle("memoize with an empty stack")),
                };
                memo.insert(idx, snapshot);
            }
            b'h' | b'j' => {
                let idx = if op == b'h' {
                    uint(take(&mut pos, 1)?)
                } else {
                    uint(take(&mut pos, 4)?)
                };
                match memo.get(&idx) {
                    Some(Some(v)) => {
                        decoded = decoded.saturating_add(match v {
                            Json::String(s) => s.len(),
                            _ => 0,
                        });
                        if decoded > MAX_PICKLE_DECODED {
                            return Err(DjangoError::PickleTooLarge);
                        }
                        stack.push(Item::Value(v.clone(), 0));
                    }
                    Some(None) => {
                        return Err(DjangoError::Pickle(
                            "shared container references are not supported",
                        ));
                    }
                    None => return Err(DjangoError::Pickle("unknown memo reference")),
                }
            }
            b's' => {
                let (v, depth) = pop(&mut stack)?;
                let (k, _) = pop(&mut stack)?;
                deepen(&mut stack, depth)?;
                set_items(&mut stack, vec![k, v])?;
            }
            b'u' => {
                let (items, depth) = pop_mark(&mut stack)?;
                deepen(&mut stack, depth)?;
                set_items(&mut stack, items)?;
            }
            b'a' => {
                let (v, depth) = pop(&mut stack)?;
                deepen(&mut stack, depth)?;
                append(&mut stack, vec![v])?;
            }
            b'e' | 0x90 => {
                let (items, depth) = pop_mark(&mut stack)?;
                deepen(&mut stack, depth)?;
                append(&mut stack, items)?;
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                if stack.len() < n {
                    return Err(DjangoError::Pickle("stack underflow"));
                }
                let mut items = Vec::with_capacity(n);
                let mut deepest = 0;
                for _ in 0..n {
                    let (v, d) = pop(&mut stack)?;
                    deepest = deepest.max(d);
                    items.push(v);
                }
                items.reverse();
                stack.push(container(items, deepest)?);
            }
            b't' | 0x91 => {
                let (items, deepest) = pop_mark(&mut stack)?;
                stack.push(container(items, deepest)?);
            }
            other => {
                return Err(DjangoError::PickleNotPlainData(other));
            }
        }
        decoded = decoded.saturating_add(8);
        if decoded > MAX_PICKLE_DECODED {
            return Err(DjangoError::PickleTooLarge);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpickles_python_session_dict() {
        // pickle.dumps({'_auth_user_id': '42', 'n': 3, 'neg': -5, 'big': 70000, 'f': 1.5,
        //   'ok': True, 'no': None, 'l': [1, 'a'], 't': (1, 2), 'huge': 2**40, 'u': 'é'},
        //   protocol=5), as printed by CPython 3.
        let data: &[u8] = b"\x80\x05\x95\x7f\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\r_auth_user_id\x94\x8c\x0242\x94\x8c\x01n\x94K\x03\x8c\x03neg\x94J\xfb\xff\xff\xff\x8c\x03big\x94Jp\x11\x01\x00\x8c\x01f\x94G?\xf8\x00\x00\x00\x00\x00\x00\x8c\x02ok\x94\x88\x8c\x02no\x94N\x8c\x01l\x94]\x94(K\x01\x8c\x01a\x94e\x8c\x01t\x94K\x01K\x02\x86\x94\x8c\x04huge\x94\x8a\x06\x00\x00\x00\x00\x00\x01\x8c\x01u\x94\x8c\x02\xc3\xa9\x94u.";
        let v = unpickle(data).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"_auth_user_id": "42", "n": 3, "neg": -5, "big": 70000, "f": 1.5,
                               "ok": true, "no": null, "l": [1, "a"], "t": [1, 2],
                               "huge": 1_099_511_627_776_i64, "u": "é"})
        );
    }

    #[test]
    fn refuses_objects() {
        // pickle.dumps(datetime.date(2020, 1, 1), protocol=2)
        let data: &[u8] = b"\x80\x02cdatetime\ndate\nq\x00c_codecs\nencode\nq\x01X\x05\x00\x00\x00\x07\xc3\xa4\x01\x01q\x02X\x06\x00\x00\x00latin1q\x03\x86q\x04Rq\x05\x85q\x06Rq\x07.";
        assert!(matches!(
            unpickle(data),
            Err(DjangoError::PickleNotPlainData(b'c'))
        ));
        assert!(unpickle(b"\x80\x05}").is_err());
        assert!(unpickle(b"").is_err());
    }

    #[test]
    fn refuses_deep_nesting_without_overflowing_the_stack() {
        // `]` x 20000, `a` x 19999: lists 20 000 deep. Built and dropped, that overflowed a
        // 2 MiB stack; run on one so the test fails the way the worker would.
        let mut data = b"\x80\x02".to_vec();
        data.extend(std::iter::repeat_n(b']', 20_000));
        data.extend(std::iter::repeat_n(b'a', 19_999));
        data.push(b'.');
        let err = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || unpickle(&data).map(|_| ()))
            .unwrap()
            .join()
            .expect("no stack overflow");
        assert!(matches!(err, Err(DjangoError::PickleTooDeep)));
        // Tuples too; 100 levels are fine.
        let mut ok = b"\x80\x02".to_vec();
        ok.extend(std::iter::repeat_n(b']', 100));
        ok.extend(std::iter::repeat_n(b'a', 99));
        ok.push(b'.');
        assert!(unpickle(&ok).is_ok());
        let mut tuples = b"\x80\x02K\x01".to_vec();
        tuples.extend(std::iter::repeat_n(0x85, 200));
        tuples.push(b'.');
        assert!(matches!(unpickle(&tuples), Err(DjangoError::PickleTooDeep)));
    }

    #[test]
    fn refuses_memo_amplification() {
        // A 64 KiB string memoized once, then referenced 100 000 times (`h\x00`, 2 bytes each):
        // 200 KB of pickle that would decode to 6.5 GB.
        let mut data = b"\x80\x02]".to_vec();
        data.push(b'X');
        data.extend_from_slice(&(65_536u32).to_le_bytes());
        data.extend(std::iter::repeat_n(b'x', 65_536));
        data.extend_from_slice(b"q\x00a");
        for _ in 0..100_000 {
            data.extend_from_slice(b"h\x00a");
        }
        data.push(b'.');
        assert!(matches!(unpickle(&data), Err(DjangoError::PickleTooLarge)));
    }
}
