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
    let failure: Mutex<Option<E>> = Mutex::new(None);
    each(workers, items, |i, item| {
        if failure.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
            return false;
        }
        match f(i, item) {
            Ok(()) => true,
            Err(e) => {
                failure.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                false
            }
        }
    });
    failure.into_inner().unwrap_or_else(|p| p.into_inner()).map_or(Ok(()), Err)
}

/// Apply `f(index, item)` to every item on up to `workers` threads; the results in item order.
pub fn map<T: Sync, R: Send>(items: &[T], workers: usize, f: impl Fn(usize, &T) -> R + Sync) -> Vec<R> {
    let slots: Vec<Mutex<Option<R>>> = items.iter().map(|_| Mutex::new(None)).collect();
    each(workers, items, |i, item| {
        let r = f(i, item);
        *slots[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        true
    });
    slots.into_iter().filter_map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner())).collect()
}

/// The worker loop of both: up to `workers` scoped threads (at least one), each taking the next item until
/// none is left or `step` returns `false` (that thread stops).
fn each<T: Sync>(workers: usize, items: &[T], step: impl Fn(usize, &T) -> bool + Sync) {
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..workers.clamp(1, items.len().max(1)) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { return };
                    if !step(i, item) {
                        return;
                    }
                }
            });
        }
    });
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
