"""Test-side S3 client (boto3, shipped with moto): make buckets, put/get/list/delete objects, count
unfinished multipart uploads, snapshot and restore a server's whole state. Independent of dsort.

usage: s3ctl.py ENDPOINT COMMAND ARGS...
  mb BUCKET...                 create buckets
  put DIR BUCKET PREFIX        upload every file of DIR as PREFIX + its relative path
  get BUCKET PREFIX DIR        download every object under PREFIX into DIR (names relative to PREFIX)
  ls BUCKET PREFIX             print NAME<TAB>SIZE of every object under PREFIX, sorted
  rm BUCKET KEY...             delete objects
  uploads BUCKET               print the number of multipart uploads not completed nor aborted
  snapshot DIR                 download every bucket and object into DIR/BUCKET/KEY
  restore DIR                  create the buckets of a snapshot and upload its objects
"""

import os
import sys

import boto3
from botocore.config import Config


def client(endpoint):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
    )


def keys(s3, bucket, prefix):
    out = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.extend((o["Key"], o["Size"]) for o in page.get("Contents", []))
    return sorted(out)


def put_dir(s3, root, bucket, prefix):
    for dirpath, _, files in os.walk(root):
        for f in sorted(files):
            path = os.path.join(dirpath, f)
            s3.upload_file(path, bucket, prefix + os.path.relpath(path, root))


def get_prefix(s3, bucket, prefix, root):
    for key, _ in keys(s3, bucket, prefix):
        dest = os.path.join(root, key[len(prefix):])
        os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
        s3.download_file(bucket, key, dest)


def main():
    endpoint, cmd, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    s3 = client(endpoint)
    if cmd == "mb":
        for b in args:
            s3.create_bucket(Bucket=b)
    elif cmd == "put":
        put_dir(s3, args[0], args[1], args[2])
    elif cmd == "get":
        get_prefix(s3, args[0], args[1], args[2])
    elif cmd == "ls":
        for key, size in keys(s3, args[0], args[1]):
            print(f"{key}\t{size}")
    elif cmd == "rm":
        for k in args[1:]:
            s3.delete_object(Bucket=args[0], Key=k)
    elif cmd == "uploads":
        print(len(s3.list_multipart_uploads(Bucket=args[0]).get("Uploads", [])))
    elif cmd == "snapshot":
        for b in s3.list_buckets()["Buckets"]:
            os.makedirs(os.path.join(args[0], b["Name"]), exist_ok=True)
            get_prefix(s3, b["Name"], "", os.path.join(args[0], b["Name"]))
    elif cmd == "restore":
        for b in sorted(os.listdir(args[0])):
            s3.create_bucket(Bucket=b)
            put_dir(s3, os.path.join(args[0], b), b, "")
    else:
        sys.exit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    main()
