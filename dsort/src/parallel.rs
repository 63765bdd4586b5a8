//! Independent work items on a few scoped threads: each thread takes the next item until none is left or
//! one has failed (the others then stop taking items); the first error is returned.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Run `f(index, item)` on every item of `items`, on at most `workers` threads (at least one); stops at the
/// first error.
pub fn try_for_each<T: Sync, E: Send>(
    workers: usize,
    items: &[T],
    f: impl Fn(usize, &T) -> Result<(), E> + Sync,
) -> Result<(), E> {
    let next = AtomicUsize::new(0);
    let failure: Mutex<Option<E>> = Mutex::new(None);
    let failed = || failure.lock().unwrap_or_else(|p| p.into_inner()).is_some();
    std::thread::scope(|scope| {
        for _ in 0..workers.clamp(1, items.len().max(1)) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { return };
                    if failed() {
                        return;
                    }
                    if let Err(e) = f(i, item) {
                        failure.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                        return;
                    }
                }
            });
        }
    });
    failure.into_inner().unwrap_or_else(|p| p.into_inner()).map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_item_once_or_the_first_error() {
        let sum = AtomicU64::new(0);
        let items: Vec<u64> = (1..=100).collect();
        try_for_each(4, &items, |_, i| {
            sum.fetch_add(*i, Ordering::Relaxed);
            Ok::<(), String>(())
        })
        .unwrap();
        assert_eq!(sum.into_inner(), 5050);
        let seen = AtomicU64::new(0);
        let r = try_for_each(1, &items, |_, i| {
            seen.fetch_add(1, Ordering::Relaxed);
            if *i == 10 { Err(format!("item {i}")) } else { Ok(()) }
        });
        assert_eq!(r, Err("item 10".to_string()));
        assert_eq!(seen.into_inner(), 10, "one worker stops at the failing item");
        assert_eq!(try_for_each(3, &[] as &[u8], |_, _| Err("never")), Ok(()));
    }
}
