"""The ideal network bytes of a finished cluster job, from where its shards lie on the targets' disks.

Usage: network_ideal.py CLUSTER_DIR TARGETS. Target i's mountpath is CLUSTER_DIR/t<i>; the input bucket is
`src`, the output bucket `dst`. A record's content bytes must cross the network exactly when the target
holding its input shard is not the creator of its output shard (the one that holds the output shard).
"""
import os
import sys
import tarfile


def main():
    root, n = sys.argv[1], int(sys.argv[2])
    holder, creator = {}, {}
    for i in range(n):
        t = f"t{i}"
        for bucket, table in (("src", holder), ("dst", creator)):
            d = os.path.join(root, t, bucket)
            for name in os.listdir(d) if os.path.isdir(d) else []:
                table[name] = t
    where = {}
    for shard, t in holder.items():
        with tarfile.open(os.path.join(root, t, "src", shard)) as f:
            for m in f:
                where[m.name] = t
    total = 0
    for shard, t in creator.items():
        with tarfile.open(os.path.join(root, t, "dst", shard)) as f:
            for m in f:
                if m.isfile() and where[m.name] != t:
                    total += m.size
    print(total)


if __name__ == "__main__":
    main()
