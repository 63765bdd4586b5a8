//! Independent work items on a few scoped threads, each thread taking the next item: [`try_for_each`] stops
//! at the first error and returns it; [`map`] collects every result in item order.

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

/// Apply `f(index, item)` to every item on up to `workers` threads; the results in item order.
pub fn map<T: Sync, R: Send>(items: &[T], workers: usize, f: impl Fn(usize, &T) -> R + Sync) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let slots: Vec<Mutex<Option<R>>> = items.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..workers.clamp(1, items.len().max(1)) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { return };
                    let r = f(i, item);
                    *slots[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
                }
            });
        }
    });
    slots.into_iter().filter_map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner())).collect()
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

    #[test]
    fn map_keeps_item_order() {
        let items: Vec<u64> = (0..50).collect();
        assert_eq!(map(&items, 3, |i, x| (i as u64, x * 2)), items.iter().map(|&x| (x, x * 2)).collect::<Vec<_>>());
    }
}
