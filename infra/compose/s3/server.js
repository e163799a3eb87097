// The compose stack's S3 store: s3rver with its files in /data (a volume), the buckets of $S3_BUCKETS created at
// start, and one key pair, $S3_ACCESS_KEY / $S3_SECRET_KEY, in place of s3rver's built-in S3RVER/S3RVER.
'use strict';
const S3rver = require('s3rver');
const account = require('s3rver/lib/models/account');

for (const name of ['S3_ACCESS_KEY', 'S3_SECRET_KEY']) {
  if (!process.env[name]) {
    console.error(`error: set ${name}`);
    process.exit(2);
  }
}
account.DUMMY_ACCOUNT.revokeAccessKey('S3RVER');
account.DUMMY_ACCOUNT.createKeyPair(process.env.S3_ACCESS_KEY, process.env.S3_SECRET_KEY);

const server = new S3rver({
  directory: process.env.S3_DIRECTORY || '/data',
  address: process.env.S3_ADDRESS || '0.0.0.0',
  port: Number(process.env.S3_PORT || 9000),
  silent: process.env.S3_SILENT === '1',
  configureBuckets: (process.env.S3_BUCKETS || '').split(',').filter(Boolean).map((name) => ({ name })),
});
server.run().then(({ address, port }) => console.log(`s3rver on ${address}:${port}`));
// Objects are written before their response is sent: stopping at once loses no acknowledged write.
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => process.exit(0));
