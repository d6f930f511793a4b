//! The in-flight save bound holds, and aborted saves stop counting against it (they stay
//! visible as aborted).

use std::time::Duration;

use ckpt_client::daemon::DaemonOptions;
use ckpt_client::SavePhase;
use ckpt_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saves_in_flight_are_bounded_and_aborted_saves_free_their_slot() {
    bounded(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let mut o = DaemonOptions::in_dir(ckptd_exe(), dir.path());
        o.extra_args = vec!["--saves-in-flight-max".into(), "2".into()];
        let mut d = start_daemon_with(o).await;
        let c = impatient_client(&d);
        for step in [1, 2] {
            c.open_save(&spec("job", step, 0, 2)).await.unwrap();
        }
        let err = c.open_save(&spec("job", 3, 0, 2)).await.unwrap_err();
        assert_eq!(err.api_code(), Some("busy"), "a third save must be refused: {err}");

        c.abort("job", 1).await.unwrap();
        c.open_save(&spec("job", 3, 0, 2)).await.expect("an aborted save frees its slot");
        let st = c.save_status("job", 1).await.unwrap();
        assert_eq!(st.phase, SavePhase::Aborted);
        let listed = c.list("job").await.unwrap();
        let phases: Vec<_> = listed.in_flight.iter().map(|s| (s.step, s.phase)).collect();
        assert_eq!(phases, vec![(1, SavePhase::Aborted), (2, SavePhase::Open), (3, SavePhase::Open)]);

        // After a restart the aborted save is gone from the journal and the bound still holds.
        d.restart().await.unwrap();
        let c = impatient_client(&d);
        assert_eq!(c.open_save(&spec("job", 4, 0, 2)).await.unwrap_err().api_code(), Some("busy"));
        // Reopening the aborted step starts it afresh once there is room.
        c.abort("job", 2).await.unwrap();
        let st = c.open_save(&spec("job", 1, 0, 2)).await.unwrap();
        assert_eq!((st.phase, st.ranks_received), (SavePhase::Open, 0));
    })
    .await
}

/// A node keeps a job's GC view (its condemned chunks) only while a save of the job is in
/// flight there: a long-lived ckptd that served many jobs does not hold a view for each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_views_are_held_only_for_jobs_with_a_save_in_flight() {
    bounded(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let d = start_daemon(dir.path()).await;
        let c = client(&d);
        let views = |s: serde_json::Value| s["gc_views_cached"].as_u64().expect("gc_views_cached in /v1/stats");
        let seed = seed(0x71e5);
        for j in 0..12u64 {
            let job = format!("job-{j}");
            let states: Vec<_> = (0..2).map(|r| rank_tensors(seed + j, r, 2, 64 << 10)).collect();
            // Rank 0 alone: the save waits for rank 1 and holds its job's view.
            c.open_save(&spec(&job, 1, 0, 2)).await.unwrap();
            c.save(&spec(&job, 1, 0, 2), &states[0], ckpt_client::Wait::Staged).await.unwrap();
            assert_eq!(views(stats(&d).await), 1, "{job}: one save in flight, one view");
            // A second save of the same job shares it, and keeps it when the first ends.
            c.open_save(&spec(&job, 2, 0, 2)).await.unwrap();
            c.save(&spec(&job, 1, 1, 2), &states[1], ckpt_client::Wait::Committed).await.unwrap();
            assert_eq!(views(stats(&d).await), 1, "{job}: the second save still holds the view");
            c.abort(&job, 2).await.unwrap();
            assert_eq!(views(stats(&d).await), 0, "{job}: no save in flight, no view");
        }
        assert_eq!(c.list("job-11").await.unwrap().committed.len(), 1);
    })
    .await
}
