#!/usr/bin/env node
// balenaEtcher's engine (etcher-sdk) as a peer of bench_peers.py (issues 30, 31): one image
// flashed to N block devices at once, verified by reading them back (unless --no-verify).
//
//   node bench/etcher_flash.js [--no-verify] [--trim] [--decompress-first] IMAGE DEVICE...
//
// The devices are handed to etcher-sdk as BlockDevice objects built from sysfs (no drivelist
// scan: that lists only what it takes for removable drives, and loop devices are not): O_DIRECT
// and O_EXCL as Etcher opens them.  --trim is Etcher's "trim ext partitions" (ConfiguredSource:
// only what the file systems use is written).  Prints one JSON line on stdout:
// {"ok", "seconds", "bytesWritten", "failures": {device: message}, "steps": [the progress
// events' types seen: flashing, verifying...], "sdk": version}.
// etcher-sdk is looked for in $ETCHER_SDK_DIR/node_modules, else bench/etcher/node_modules
// (see bench/README.md for the install); exit 3 when it is missing, 2 on bad arguments, 1 when
// a device failed.
'use strict';

const fs = require('fs');
const path = require('path');

function loadSdk() {
	const dir = process.env.ETCHER_SDK_DIR || path.join(__dirname, 'etcher');
	let where;
	try {
		where = require.resolve('etcher-sdk', { paths: [dir] });
	} catch (e) {
		process.stderr.write(`etcher-sdk is not installed in ${dir}: cd bench/etcher && ` +
			'npm install (see bench/README.md)\n');
		process.exit(3);
	}
	const pkg = require(path.join(path.dirname(where), '..', 'package.json'));
	return { sdk: require(where), version: pkg.version };
}

function sysfs(device, file) {
	const name = path.basename(fs.realpathSync(device));
	return fs.readFileSync(`/sys/class/block/${name}/${file}`, 'utf8').trim();
}

// What drivelist would say of the device, from sysfs: etcher-sdk reads only these fields.
function driveOf(device) {
	const blockSize = Number(sysfs(device, 'queue/logical_block_size'));
	return {
		device,
		raw: device,
		devicePath: null,
		description: `bench ${device}`,
		size: Number(sysfs(device, 'size')) * 512,
		blockSize,
		logicalBlockSize: blockSize,
		mountpoints: [],
		isReadOnly: sysfs(device, 'ro') === '1',
		isSystem: false,
		isRemovable: true,
		isVirtual: false,
		busType: 'USB',
		enumerator: 'bench',
		error: null,
		partitionTableType: null,
	};
}

async function main(argv) {
	const flags = new Set(argv.filter((a) => a.startsWith('--')));
	const [image, ...devices] = argv.filter((a) => !a.startsWith('--'));
	const known = new Set(['--no-verify', '--trim', '--decompress-first']);
	const unknown = [...flags].filter((f) => !known.has(f));
	if (!image || devices.length === 0 || unknown.length) {
		process.stderr.write('usage: etcher_flash.js [--no-verify] [--trim] ' +
			'[--decompress-first] IMAGE DEVICE...\n');
		return 2;
	}
	const notBlock = devices.filter((d) => !fs.existsSync(d) || !fs.statSync(d).isBlockDevice());
	if (notBlock.length) {
		process.stderr.write(`not block devices: ${notBlock.join(' ')}\n`);
		return 2;
	}
	const { sdk, version } = loadSdk();
	const { File, BlockDevice } = sdk.sourceDestination;
	const source = new File({ path: image });
	const destinations = devices.map((device) => new BlockDevice({
		drive: driveOf(device), write: true, direct: true, unmountOnSuccess: false,
	}));
	const failures = {};
	const steps = new Set();
	const began = process.hrtime.bigint();
	const result = await sdk.multiWrite.decompressThenFlash({
		source,
		destinations,
		onFail: (destination, error) => { failures[destination.drive.device] = error.message; },
		onProgress: (progress) => { steps.add(progress.type); },
		verify: !flags.has('--no-verify'),
		trim: flags.has('--trim'),
		decompressFirst: flags.has('--decompress-first'),
		numBuffers: 16,
	});
	const seconds = Number(process.hrtime.bigint() - began) / 1e9;
	for (const [destination, error] of result.failures) {
		failures[destination.drive.device] = error.message;
	}
	const ok = Object.keys(failures).length === 0;
	process.stdout.write(JSON.stringify({
		ok, seconds, bytesWritten: result.bytesWritten, failures, steps: [...steps], sdk: version,
	}) + '\n');
	return ok ? 0 : 1;
}

main(process.argv.slice(2)).then((code) => process.exit(code), (error) => {
	process.stderr.write(`${error.stack || error}\n`);
	process.exit(1);
});
